"""Scale: meta-training tasks/s, bank-build ms/document, peak memory and the FLOP bound for
SmolLM2-135M, the Llama-3.2-1B shape and the Llama-3.1-8B shape, in one run.

    # one H100/H200, every shape, sized for about 5 minutes (the command the README names):
    python benchmarks/scale.py --device cuda --json benchmarks/results/scale_cuda.json
    # CPU, what fits (about 10 minutes on 2 shared cores; the 8b shape prints that it needs a GPU):
    nice python benchmarks/scale.py --device cpu --shapes 135m,8b --meta-tasks 4 --bank-batches 1,8 --warmup 1 --max-steps 2

The 1B and 8B shapes are built from ``LlamaConfig`` with the real sizes and RANDOM weights
(no model hub here): speed and memory depend on the shapes, not on the values. 135M is the
embedded SmolLM2-135M-Instruct when its cached copy exists, else random weights of its config.
Text is synthetic: passages cut at ``--doc-tokens`` tokens, questions of a dozen words; the
printed token counts say what was run.

Meta-training runs ``MetaTrainer.train_step`` (inner gradients with create_graph, outer loss,
AdamW), ``--meta-tasks`` tasks of ``--k`` passages per step, mode ``--mode``. Bank building
runs ``document_gradients`` and copies the gradients to the host (as ``regrad build`` does;
no disk writes), batch sizes ``--bank-batches`` until one runs out of memory. The FLOP bound
is the forward pass plus the backward pass that per-document LoRA gradients need (activation
gradients from the first adapted layer up, no weight gradients; no recomputation counted)
at the device's peak FLOP/s (table below or ``--peak-tflops``); on CPU a measured matmul
rate stands in for the peak (said so in the output).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from regrad_engine.config import MetaTrainConfig  # noqa: E402
from regrad_engine.data import MetaExample  # noqa: E402
from regrad_engine.gradients import document_gradients  # noqa: E402
from regrad_engine.lora import LoraSpace  # noqa: E402
from regrad_engine.meta import MetaTrainer, prefetched  # noqa: E402
from regrad_engine.prompts import encode_documents, encode_qa_batch  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """A model shape and the LoRA space the paper (or our default) uses with it."""

    config: dict
    lora_layers: list[int]
    r: int
    lora_alpha: int
    note: str
    checkpointing: bool  # default for --checkpointing auto
    micro_batch: int | None  # default for --micro-batch auto


SHAPES = {
    # SmolLM2-135M-Instruct's config; LoRA as regrad's default (layers 20-25 of 30, r=16)
    "135m": Shape(dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                       rms_norm_eps=1e-5, max_position_embeddings=8192),
                  list(range(20, 26)), 16, 32, "SmolLM2-135M", checkpointing=False, micro_batch=None),
    # meta-llama/Llama-3.2-1B's sizes; the paper's LoRA (MLP of layers 8-15, r=16)
    "1b": Shape(dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
                list(range(8, 16)), 16, 32, "Llama-3.2-1B shape, random weights", checkpointing=False,
                micro_batch=None),
    # meta-llama/Llama-3.1-8B's sizes; the paper's LoRA (MLP of layers 16-31, r=4)
    "8b": Shape(dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                     rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
                list(range(16, 32)), 4, 8, "Llama-3.1-8B shape, random weights", checkpointing=True,
                micro_batch=4),
}

# Dense peak FLOP/s per device name fragment (vendor datasheets, no sparsity): (bf16, fp32 without TF32).
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100 PCIe": (756e12, 51e12), "H100 NVL": (835e12, 60e12),
              "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WORDS = ("river city doctor violin bureau harbour museum engine garden winter council market island "
         "painter school bridge village forest treaty station railway library sailor mountain festival").split()


# ---------------------------------------------------------------------- model, tokenizer, data
def build_model(name: str, device: torch.device, dtype: torch.dtype, embedded: bool):
    """(model, label): the embedded 135M when asked and cached, else random weights of the shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name == "135m" and embedded:
        from regrad_engine.models import cache_dir, load_model

        if (cache_dir() / "models" / "smollm2-135m-instruct" / "model.safetensors").exists():
            loaded = load_model(None, device=device, dtype=dtype, attn_implementation="sdpa")
            return loaded.model, "SmolLM2-135M-Instruct (embedded weights)"
    config = LlamaConfig(**SHAPES[name].config)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval().requires_grad_(False), SHAPES[name].note + ("" if name != "135m" else ", random weights")


def build_tokenizer(path: str | None):
    """The embedded model's tokenizer when cached (or ``path``), else a byte-level BPE trained here."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from regrad_engine.models import cache_dir

    cached = cache_dir() / "models" / "smollm2-135m-instruct"
    if path or (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(path or cached), str(path or "SmolLM2 tokenizer")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok, "byte-level BPE trained in-process (no tokenizer cached)"


def passage(tokenizer, rng: random.Random, tokens: int) -> str:
    """Random words until the text is at least ``tokens`` tokens long."""
    words = [rng.choice(WORDS) for _ in range(tokens // 2)]
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
        words += [rng.choice(WORDS) for _ in range(16)]
    return " ".join(words).capitalize() + "."


def make_tasks(tokenizer, n: int, k: int, doc_tokens: int, seed: int) -> list[MetaExample]:
    rng = random.Random(seed)
    return [MetaExample(f"Which {' '.join(rng.choice(WORDS) for _ in range(10))} is named here?",
                        [" ".join(rng.choice(WORDS) for _ in range(3))],
                        [passage(tokenizer, rng, doc_tokens) for _ in range(k)]) for _ in range(n)]


# ---------------------------------------------------------------------- FLOPs and peaks
def bank_flops_per_document(config: dict, lora_layers: list[int], r: int, tokens: int) -> float:
    """Forward of every layer + activation-gradient backward from the first adapted layer up
    (frozen weights: no weight gradients), LM head both ways, LoRA forward/backward, causal attention."""
    h, inter, layers, vocab = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q_width, kv_width = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    layer_params = h * q_width + 2 * h * kv_width + q_width * h + 3 * h * inter
    attention = 2 * q_width * tokens * tokens  # QK^T and PV, causal half: 2 matmuls x 2 FLOPs x t^2/2 x width
    forward = 2 * layer_params * tokens + attention
    backward = 2 * layer_params * tokens + 2 * attention
    lora = 6 * tokens * r * (2 * (h + inter) + (inter + h)) * len(lora_layers)  # gate, up, down
    head = 2 * 2 * h * vocab * tokens
    return layers * forward + (layers - min(lora_layers)) * backward + head + lora


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None) -> tuple[float, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (bf16, fp32) in PEAK_FLOPS.items():
            if fragment in name:
                return (bf16 if dtype == torch.bfloat16 else fp32), f"{name} datasheet, dense"
        return float("nan"), f"{name}: not in the table, pass --peak-tflops"
    a = torch.randn(1024, 1024, dtype=dtype)
    a @ a
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        a @ a
        count += 1
    rate = 2 * 1024 ** 3 * count / (time.perf_counter() - start)
    return rate, "CPU: no peak defined; a measured 1024x1024 matmul rate stands in"


# ---------------------------------------------------------------------- measurements
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS (process peak so far)"


def timed_loop(step, device: torch.device, budget: float, warmup: int, max_steps: int) -> tuple[int, float]:
    """(steps, seconds) of ``step()`` repeated for about ``budget`` seconds after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start, steps = time.perf_counter(), 0
    while steps < max_steps and (steps == 0 or time.perf_counter() - start < budget):
        step()
        steps += 1
    synchronize(device)
    return steps, time.perf_counter() - start


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def measure_meta(model, tokenizer, shape: Shape, args, device, checkpointing: bool, tasks_per_step: int) -> dict:
    space = LoraSpace.attach(model, _lora_config(shape))
    config = MetaTrainConfig(data="-", out="-", k=args.k, tasks_per_step=tasks_per_step, steps=10**6, mode=args.mode,
                             doc_max_tokens=args.doc_tokens, bf16=args.autocast,
                             gradient_checkpointing=checkpointing, device=str(device), alpha_init=1.0,
                             micro_batch=_micro_batch(args, shape))
    trainer = MetaTrainer(model, tokenizer, space, config, base_model="benchmark", base_fingerprint="random")
    tasks = make_tasks(tokenizer, 4 * tasks_per_step, args.k, args.doc_tokens, seed=1)
    batches = [tasks[i:i + tasks_per_step] for i in range(0, len(tasks), tasks_per_step)]
    qa = encode_qa_batch(tokenizer, [t.question for t in tasks[:2]], [t.answers[0] for t in tasks[:2]],
                         [None, tasks[1].passages], config.qa_max_length)
    reset_peak(device)
    with ThreadPoolExecutor(max_workers=1) as pool:  # as MetaTrainer.fit: the next batch tokenised meanwhile
        stream = prefetched(trainer.encode, itertools.cycle(batches), pool)
        steps, seconds = timed_loop(lambda: trainer.train_step(next(stream)), device, args.budget,
                                    warmup=args.warmup, max_steps=args.max_steps)
    return {"tasks_per_s": steps * tasks_per_step / seconds, "s_per_step": seconds / steps, "steps": steps,
            "micro_batch": config.micro_batch,
            "peak": peak_gib(device), "qa_tokens_parametric_hybrid": [int(n) for n in qa["attention_mask"].sum(1)]}


def measure_bank(model, tokenizer, shape: Shape, args, device, checkpointing: bool, batch: int) -> dict:
    space = LoraSpace.attach(model, _lora_config(shape))
    phi = {k: v.to(device) for k, v in space.init_phi(seed=0).items()}
    phi = {k: (v if k.endswith("lora_A") else torch.randn_like(v) * 0.01) for k, v in phi.items()}  # B != 0
    rng = random.Random(2)
    docs = encode_documents(tokenizer, [passage(tokenizer, rng, args.doc_tokens) for _ in range(batch)],
                            args.doc_tokens)
    docs = {k: v.to(device) for k, v in docs.items()}

    def step():
        grads = document_gradients(model, space, phi, docs, checkpoint_layers=checkpointing)
        return {k: g.detach().cpu() for k, g in grads.items()}

    reset_peak(device)
    steps, seconds = timed_loop(step, device, args.budget / max(1, len(args.bank_batches)), warmup=1,
                                max_steps=args.max_steps)
    return {"ms_per_doc": 1000 * seconds / (steps * batch), "batches": steps, "peak": peak_gib(device),
            "doc_tokens": int(docs["attention_mask"].sum(1).max())}


def _micro_batch(args, shape: Shape) -> int | None:
    if args.micro_batch == "auto":
        return shape.micro_batch
    return None if args.micro_batch == "off" else int(args.micro_batch)


def _lora_config(shape: Shape):
    from peft import LoraConfig

    return LoraConfig(r=shape.r, lora_alpha=shape.lora_alpha, target_modules=["gate_proj", "up_proj", "down_proj"],
                      layers_to_transform=shape.lora_layers, layers_pattern="layers", lora_dropout=0.0)


# ---------------------------------------------------------------------- driver
def run_shape(name: str, args, device, dtype, tokenizer, deadline: float, report) -> None:
    shape = SHAPES[name]
    needed = _weight_bytes(shape, dtype)
    if device.type == "cpu" and needed > args.cpu_memory_gib * 2**30:
        report({"shape": name, "skipped": f"weights alone need {needed / 2**30:.0f} GiB: run it on a GPU (--device cuda)"})
        return
    started = time.perf_counter()
    model, label = build_model(name, device, dtype, args.embedded)
    params = sum(p.numel() for p in model.parameters())
    report({"shape": name, "model": label, "parameters": params, "dtype": args.dtype, "device": str(device),
            "load_s": round(time.perf_counter() - started, 1)})
    modes = {"on": [True], "off": [False], "both": [False, True], "auto": [shape.checkpointing]}[args.checkpointing]
    peak, peak_source = peak_flops(device, dtype, args.peak_tflops)
    flops = bank_flops_per_document(shape.config, shape.lora_layers, shape.r, args.doc_tokens)
    for checkpointing in modes:
        for job in ("meta", "bank"):
            if job not in args.jobs:
                continue
            for batch in (args.bank_batches if job == "bank" else args.meta_tasks):
                if time.perf_counter() > deadline:
                    report({"shape": name, "job": job, "batch": batch, "skipped": "--total-budget spent"})
                    continue
                row = {"shape": name, "job": job, "batch": batch, "checkpointing": checkpointing}
                try:
                    if job == "meta":
                        row.update(measure_meta(model, tokenizer, shape, args, device, checkpointing, batch))
                    else:
                        row.update(measure_bank(model, tokenizer, shape, args, device, checkpointing, batch))
                        bound = 1000 * flops / peak
                        row.update({"flop_bound_ms_per_doc": bound, "of_bound": bound / row["ms_per_doc"],
                                    "gflop_per_doc": flops / 1e9, "peak_tflops": peak / 1e12, "peak_source": peak_source})
                except (RuntimeError, torch.OutOfMemoryError) as err:
                    if not is_oom(err):
                        raise
                    row["oom"] = True
                report(row)
                reset_peak(device)
                if (job == "bank") == bool(row.get("oom")):
                    break  # bank: larger batches do not fit either; meta: the largest that fits is measured
    model.to("meta")
    del model
    reset_peak(device)


def _weight_bytes(shape: Shape, dtype: torch.dtype) -> int:
    c = shape.config
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    layer = (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * head_dim * c["hidden_size"] \
        + 3 * c["hidden_size"] * c["intermediate_size"]
    embeddings = c["vocab_size"] * c["hidden_size"] * (1 if c["tie_word_embeddings"] else 2)
    return (c["num_hidden_layers"] * layer + embeddings) * torch.tensor([], dtype=dtype).element_size()


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"  {row['shape']} {row.get('job', '')} {row.get('batch', '')}: skipped ({row['skipped']})"
    if "model" in row:
        return (f"\n== {row['shape']}: {row['model']}, {row['parameters'] / 1e6:,.0f}M parameters, {row['dtype']} on "
                f"{row['device']} (built in {row['load_s']} s)")
    ck = "checkpointed" if row["checkpointing"] else "plain"
    if row.get("oom"):
        return f"  {row['job']:4} batch {row['batch']:>3} {ck:12}: out of memory"
    if row["job"] == "meta":
        micro = f", micro-batches of {row['micro_batch']}" if row["micro_batch"] else ""
        return (f"  meta batch {row['batch']:>3} {ck:12}: {row['tasks_per_s']:8.2f} tasks/s  {row['s_per_step']:7.3f} s/step{micro} "
                f"({row['steps']} steps)  peak {row['peak']}  QA tokens {row['qa_tokens_parametric_hybrid']}")
    rate = row["peak_tflops"]
    rate_text = f"{rate:.0f} TFLOP/s" if rate >= 1 else f"{1000 * rate:.0f} GFLOP/s"
    return (f"  bank batch {row['batch']:>3} {ck:12}: {row['ms_per_doc']:8.2f} ms/doc  peak {row['peak']}  "
            f"FLOP bound {row['flop_bound_ms_per_doc']:.2f} ms/doc ({row['gflop_per_doc']:.0f} GFLOP/doc at "
            f"{rate_text}: {row['peak_source']}) = {100 * row['of_bound']:.0f}% of bound")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="135m,1b,8b", help="comma-separated: 135m, 1b, 8b")
    p.add_argument("--jobs", default="meta,bank", help="comma-separated: meta, bank")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-autocast", dest="autocast", action="store_false",
                   help="no bf16 autocast in meta-training (the default on CUDA, as in MetaTrainConfig; never on CPU)")
    p.add_argument("--checkpointing", choices=["auto", "on", "off", "both"], default="auto",
                   help="activation checkpointing (auto: on for 8b only)")
    p.add_argument("--meta-tasks", default="16,4,1",
                   help="tasks per meta-step, comma-separated, descending: the first that fits is measured")
    p.add_argument("--micro-batch", default="auto",
                   help="tasks per forward/backward in a meta-step: a number, off, or auto (4 for 8b, else off)")
    p.add_argument("--k", type=int, default=3, help="passages per task")
    p.add_argument("--mode", choices=["parametric", "hybrid", "mixed"], default="mixed")
    p.add_argument("--doc-tokens", type=int, default=200)
    p.add_argument("--bank-batches", default="8,16,32,64,128", help="comma-separated, ascending; stops at the first OOM")
    p.add_argument("--budget", type=float, default=12.0, help="seconds per measurement (bank: shared by its batches)")
    p.add_argument("--total-budget", type=float, default=400.0, help="skip what is left after this many seconds")
    p.add_argument("--warmup", type=int, default=2, help="meta-steps before timing")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak FLOP/s")
    p.add_argument("--no-embedded", dest="embedded", action="store_false", help="random 135M weights even if cached")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: SmolLM2's if cached)")
    p.add_argument("--cpu-memory-gib", type=float, default=12.0, help="skip shapes whose weights exceed this on CPU")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write every row as JSON lines here")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.bank_batches = [int(b) for b in args.bank_batches.split(",")]
    args.meta_tasks = [int(n) for n in args.meta_tasks.split(",")]
    args.jobs = args.jobs.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    deadline = time.perf_counter() + args.total_budget
    tokenizer, tokenizer_label = build_tokenizer(args.tokenizer)
    rows: list[dict] = []

    def report(row: dict) -> None:
        rows.append(row)
        print(format_row(row), flush=True)

    print(f"scale benchmark: torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, tokenizer: {tokenizer_label}")
    started = time.perf_counter()
    for name in args.shapes.split(","):
        run_shape(name, args, device, dtype, tokenizer, deadline, report)
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
