"""Compressed Gradient Banks against bf16: bytes per document and EM / F1 of ReGrad on the same questions.

    python benchmarks/bank_compression.py --data runs/synth --meta regrad_engine/checkpoints/smollm2-135m-synth \\
        --kinds bf16,int8-rank7,int8 --modes parametric,hybrid --out benchmarks/results/bank_compression_synth.json
    python benchmarks/bank_compression.py --data runs/general --meta regrad_engine/checkpoints/smollm2-135m-general \\
        --limit 50 --kinds bf16,int8-rank7,int8 --out benchmarks/results/bank_compression_general.json
    python benchmarks/bank_compression.py --data runs/general --meta regrad_engine/checkpoints/smollm2-135m-general \\
        --limit 50 --kinds bf16,int8-rank7 --modes hybrid --out benchmarks/results/bank_compression_general_hybrid.json

The questions are those of ``regrad eval`` (given setting: each question's k passages, gold
among hard negatives; ``--limit`` per set). Every passage's gradient is computed once, in
fp32, into a cache bank (``--cache``; a rerun reuses it), then stored in a bank of each kind
(dequantised at read as in serving); every kind answers the same questions with the same
passages, greedy. Prints one table per mode (the first kind is the reference) and writes
scores, sizes and every answer to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def cached_gradients(model, space, meta, chunks, cache: Path, batch_size: int):
    """The fp32 bank of every passage's gradient (computed for what the cache lacks)."""
    from regrad_engine.bank import GradientBank
    from regrad_engine.store import add_gradients

    binding = {"benchmark": "bank_compression", "meta": meta.fingerprint(), "model": "embedded"}
    with GradientBank.open_or_create(cache, binding=binding, shapes=space.shapes, storage_dtype="fp32",
                                     shard_size=64) as bank:
        add_gradients(model.model, model.tokenizer, space, meta.phi, chunks, bank, batch_size=batch_size)
    return GradientBank.open(cache, binding=binding)


def store_as(source, ids: list[str], kind: str, path: Path):
    """A bank of ``kind`` holding the source bank's gradients of ``ids`` (encoded from fp32)."""
    from regrad_engine.bank import GradientBank

    bank = GradientBank.create(path, binding={"kind": kind}, shapes=source.shapes, storage_dtype=kind,
                               shard_size=len(ids))
    for start in range(0, len(ids), 64):
        batch = ids[start:start + 64]
        grads = [source.get(i) for i in batch]
        bank.add_batch(batch, {k: torch.stack([g[k] for g in grads]) for k in source.shapes})
    bank.close()
    return GradientBank.open(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a data directory (`regrad synth` / `regrad data`)")
    parser.add_argument("--meta", required=True, help="meta checkpoint")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each set")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--kinds", default="bf16,int8,int8-rank7", help="storage kinds; the first is the reference")
    parser.add_argument("--modes", default="parametric", help="parametric,hybrid")
    parser.add_argument("--cache", default=None, help="fp32 gradient cache bank (default runs/compression/<data>)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.data import Chunk, eval_items, load_documents
    from regrad_engine.inference import ReGrad
    from regrad_engine.lora import LoraSpace
    from regrad_engine.metrics import score_predictions
    from regrad_engine.models import load_model
    from regrad_engine.retrieval import Hit

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(None)
    meta = MetaCheckpoint.load(args.meta)
    meta.check_base(model.fingerprint, model.name, tokenizer=model.tokenizer)
    space = LoraSpace.attach(model.model, meta.lora)
    items = eval_items(args.data, args.split, k=args.k, seed=0, limit=args.limit)
    docs = load_documents(args.data)
    documents = [[Hit(d, docs[d]["text"], 0.0) for d in item.doc_ids] for item in items]
    ids = sorted({h.id for d in documents for h in d})
    chunks = [Chunk(id=d, text=docs[d]["text"], source_id=d, index=0) for d in ids]
    cache = Path(args.cache or ROOT / "runs" / "compression" / f"{Path(args.data).name}-{args.split}-fp32")
    started = time.perf_counter()
    source = cached_gradients(model, space, meta, chunks, cache, batch_size=8)
    print(f"{len(items)} questions, {len(ids)} passages; gradients ready in {time.perf_counter() - started:.0f} s "
          f"(cache {cache})", flush=True)

    kinds, modes = args.kinds.split(","), args.modes.split(",")
    questions, answers = [item.question for item in items], [item.answers for item in items]
    report: dict = {"data": args.data, "meta": args.meta, "split": args.split, "limit": args.limit, "k": args.k,
                    "questions": len(items), "passages": len(ids), "kinds": {}, "answers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            bank = store_as(source, ids, kind, Path(tmp) / kind)
            on_disk = sum(f.stat().st_size for f in (Path(tmp) / kind).glob("shard-*.safetensors"))
            engine = ReGrad(model.model, model.tokenizer, space, meta, bank=bank, k=args.k, on_the_fly=False,
                            batch_size=args.batch_size)
            entry = {"bytes_per_document": bank.nbytes_per_document(), "shard_bytes_per_document": on_disk / len(ids),
                     "modes": {}}
            for mode in modes:
                started = time.perf_counter()
                predictions = [a.text for a in engine.answer_batch(questions, documents=documents, mode=mode)]
                scores = score_predictions(predictions, answers)
                entry["modes"][mode] = {"exact_match": scores.exact_match, "f1": scores.f1,
                                        "seconds": time.perf_counter() - started}
                report["answers"].setdefault(mode, {})[kind] = predictions
                print(f"{kind:12s} {mode:10s} EM {scores.exact_match:.4f} F1 {scores.f1:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
            report["kinds"][kind] = entry
            bank.close()
    print()
    print(markdown(report, kinds, modes))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        Path(args.out).with_suffix(".md").write_text(markdown(report, kinds, modes) + "\n")
    return 0


def markdown(report: dict, kinds: list[str], modes: list[str]) -> str:
    ref = kinds[0]
    ref_bytes = report["kinds"][ref]["shard_bytes_per_document"]
    lines = [f"{report['questions']} questions ({report['data']}, split {report['split']}, "
             f"limit {report['limit']} per set), {report['passages']} passages, k={report['k']}; "
             f"reference: {ref}", ""]
    for mode in modes:
        lines += [f"**{mode}**", "", f"| storage | bytes/document on disk | vs {ref} | EM | F1 | EM - {ref} | "
                  f"F1 - {ref} | answers that differ |", "|---|---|---|---|---|---|---|---|"]
        base = report["kinds"][ref]["modes"][mode]
        for kind in kinds:
            entry = report["kinds"][kind]
            s = entry["modes"][mode]
            changed = sum(a != b for a, b in zip(report["answers"][mode][kind], report["answers"][mode][ref]))
            lines.append(f"| {kind} | {entry['shard_bytes_per_document']:,.0f} | "
                         f"{ref_bytes / entry['shard_bytes_per_document']:.2f}x smaller | {s['exact_match']:.4f} | "
                         f"{s['f1']:.4f} | {s['exact_match'] - base['exact_match']:+.4f} | "
                         f"{s['f1'] - base['f1']:+.4f} | {changed} of {report['questions']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
