"""A Gradient Bank of a million entries: how long it takes to open and to sum k gradients,
and how many bytes an entry takes per storage kind.

    python benchmarks/bank_scale.py --entries 1000000 --kinds bf16,int8,int8-rank2

Entries are random gradients of small LoRA shapes (rank 4 on one 16 -> 16 layer: 128 numbers),
written through the bank API in batches of ``--shard-size`` (one shard file per batch). Open
is timed on a fresh bank object (the files are in the page cache: the build just wrote them),
the sums as ``sum_batch`` of one request of k random ids, median of ``--repeats`` draws; the
same sums on a bank of ``--small`` entries show that the cost does not grow with the bank.
Each time is given as wall clock / CPU time of this process (on a shared machine the wall
clock also counts waiting for a core).
Sizes per entry are also given for the LoRA of the 135M model (r=16 on gate/up/down of 6
layers), from the stored bytes of a 16-entry bank, with the time to sum k=3 of its entries.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SMALL_SHAPES = {"l0.mlp.lora_A": (4, 16), "l0.mlp.lora_B": (16, 4)}
SMOLLM_SHAPES = {f"model.layers.{i}.mlp.{p}.lora_{ab}": shape
                 for i in range(20, 26)
                 for p, (d_in, d_out) in {"gate_proj": (576, 1536), "up_proj": (576, 1536),
                                          "down_proj": (1536, 576)}.items()
                 for ab, shape in (("A", (16, d_in)), ("B", (d_out, 16)))}


def build(path: Path, kind: str, shapes: dict, entries: int, shard_size: int, seed: int = 0) -> float:
    """Write ``entries`` random gradients; returns the seconds it took."""
    from regrad_engine.bank import GradientBank

    g = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    with GradientBank.create(path, binding={"benchmark": "scale"}, shapes=shapes, storage_dtype=kind,
                             shard_size=shard_size) as bank:
        for start in range(0, entries, shard_size):
            n = min(shard_size, entries - start)
            grads = {k: torch.randn((n, *s), generator=g) for k, s in shapes.items()}
            bank.add_batch([f"doc-{i:08d}" for i in range(start, start + n)], grads)
    return time.perf_counter() - started


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_open(path: Path, repeats: int) -> list[tuple[float, float]]:
    from regrad_engine.bank import GradientBank

    times, opened = [], []
    for _ in range(repeats):
        gc.collect()
        times.append(timed(lambda: opened.append(GradientBank.open(path))))
        opened.pop().close()
    return times


def time_sums(path: Path, entries: int, ks: list[int], repeats: int) -> dict[int, tuple[float, float]]:
    """Median (wall, CPU) seconds of one sum_batch of k random ids (after one warm-up draw)."""
    from regrad_engine.bank import GradientBank

    bank = GradientBank.open(path)
    rng = random.Random(0)
    out = {}
    for k in ks:
        draws = [[f"doc-{rng.randrange(entries):08d}" for _ in range(k)] for _ in range(repeats + 1)]
        bank.sum_batch([draws[0]])
        times = [timed(lambda ids=ids: bank.sum_batch([ids])) for ids in draws[1:]]
        out[k] = (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))
    bank.close()
    return out


def ms(t: tuple[float, float]) -> str:
    return f"{1000 * t[0]:.1f} / {1000 * t[1]:.1f} ms"


def sizes(kinds: list[str], shapes: dict, tmp: Path, repeats: int) -> dict[str, tuple[float, tuple[float, float]]]:
    """Bytes per entry on disk (16 entries in one shard, header included) and the time of a sum of 3."""
    out = {}
    for kind in kinds:
        path = tmp / f"size-{kind}"
        build(path, kind, shapes, 16, 16)
        size = sum(f.stat().st_size for f in path.glob("shard-*.safetensors")) / 16
        out[kind] = (size, time_sums(path, 16, [3], repeats)[3])
        shutil.rmtree(path)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000, help="entries of the bank the sums are compared with")
    parser.add_argument("--kinds", default="bf16,int8-rank2")
    parser.add_argument("--size-kinds", default="fp32,bf16,int8,int8-rank7,int8-rank4")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--ks", default="3,10,100")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dir", default=None, help="where to build (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="also write the tables here (Markdown)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    lines = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        say("| storage | entries | shards | build | open, wall / CPU (median of 3) | "
            + " | ".join(f"sum of k={k}" for k in ks) + f" | same sums, {args.small:,} entries |")
        say("|---|---|---|---|---|" + "---|" * len(ks) + "---|")
        for kind in args.kinds.split(","):
            big, small = tmp / f"{kind}-big", tmp / f"{kind}-small"
            seconds = build(big, kind, SMALL_SHAPES, args.entries, args.shard_size)
            build(small, kind, SMALL_SHAPES, args.small, min(args.shard_size, args.small))
            opens = time_open(big, 3)
            sums, sums_small = (time_sums(p, n, ks, args.repeats) for p, n in ((big, args.entries), (small, args.small)))
            shards = len(list(big.glob("shard-*.safetensors")))
            wall, cpu = statistics.median(t[0] for t in opens), statistics.median(t[1] for t in opens)
            say(f"| {kind} | {args.entries:,} | {shards} | {seconds:.0f} s | {wall:.2f} / {cpu:.2f} s | "
                + " | ".join(ms(sums[k]) for k in ks) + " | " + ", ".join(ms(sums_small[k]) for k in ks) + " |")
            shutil.rmtree(big)
            shutil.rmtree(small)
        say()
        kinds = args.size_kinds.split(",")
        for name, shapes in (("small shapes (128 numbers)", SMALL_SHAPES),
                             ("SmolLM2-135M LoRA (r=16, 608,256 numbers)", SMOLLM_SHAPES)):
            measured = sizes(kinds, shapes, tmp, args.repeats)
            say(f"{name}:")
            say()
            say("| storage | bytes per entry on disk | vs bf16 | sum of k=3, wall / CPU |")
            say("|---|---|---|---|")
            for k in kinds:
                size, summed = measured[k]
                ratio = f"{measured['bf16'][0] / size:.2f}x smaller" if "bf16" in measured else ""
                say(f"| {k} | {size:,.0f} B | {ratio} | {ms(summed)} |")
            say()
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
