"""What the example bots share: options, the meta checkpoint, the held-out store, the score table."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "checkpoints"
GENERAL_META = CHECKPOINTS / "smollm2-135m-synth"
EVAL_SYSTEMS = ("direct", "rag", "regrad", "regrad_hybrid")


def rel(path: Path) -> str:
    """A path relative to the repository root when it is inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def add_arguments(parser: argparse.ArgumentParser, *, default_meta: Path, name: str) -> None:
    parser.add_argument("--meta", default=None,
                        help=f"meta checkpoint (default: {rel(default_meta)}, else the general {rel(GENERAL_META)})")
    parser.add_argument("--model", default=None, help="base model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "examples" / name),
                        help="where the data directory and the store are written")
    parser.add_argument("--questions", type=int, default=4, help="held-out questions answered through the framework")
    parser.add_argument("--limit", type=int, default=100, help="held-out questions scored in the accuracy table (0: skip)")
    parser.add_argument("--k", type=int, default=3, help="documents per question")
    parser.add_argument("--max-docs", dest="max_docs", type=int, default=None,
                        help="put only the first N held-out documents in the store (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def resolve_meta(requested: str | None, default: Path, train_hint: str) -> Path | None:
    """The checkpoint to use: --meta, else the domain one, else (with a note) the general one.
    A training output directory is accepted too (its ``best/`` is used)."""
    def usable(path: Path) -> Path | None:
        for candidate in (path, path / "best"):
            if (candidate / "manifest.json").exists():
                return candidate
        return None

    if requested:
        found = usable(Path(requested))
        if found is None:
            print(f"error: no meta checkpoint at {requested} (expected manifest.json there or in best/)")
        return found
    found = usable(default)
    if found is not None:
        return found
    print(f"note: no domain meta checkpoint at {rel(default)}; make it with\n{train_hint}")
    found = usable(GENERAL_META)
    if found is None:
        print(f"error: no general meta checkpoint at {rel(GENERAL_META)} either: pass --meta DIR")
        return None
    print(f"note: falling back to the general checkpoint {rel(GENERAL_META)} "
          "(meta-trained on synthetic data only: expect weaker answers than with the domain checkpoint)\n")
    return found


def load(args):
    import torch

    from regrad_engine.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, device=args.device)


def open_held_out_store(workdir: Path, documents: Sequence[dict], model, meta: Path, *, k: int):
    """Build (or reuse) a store over these held-out documents and open an engine on it.
    The store's folder is named after the model and checkpoint, so another --meta gets its own."""
    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.chunking import chunk_documents
    from regrad_engine.pipeline import build_store, open_engine

    fingerprint = MetaCheckpoint.load(meta).fingerprint()[:10]
    store = workdir / f"store-{model.fingerprint[:8]}-{fingerprint}"
    chunks = chunk_documents([{k_: d[k_] for k_ in ("id", "text", "title")} for d in documents],
                             model.tokenizer, max_tokens=200)
    print(f"store {rel(store)}: "
          f"{len(documents)} held-out documents, {len(chunks)} chunks", flush=True)
    stats = build_store(store, chunks, model=model, meta_path=str(meta), progress=False)
    print(f"  {stats.added} gradients computed ({stats.ms_per_document:.0f} ms each), {stats.skipped} reused\n",
          flush=True)
    return open_engine(store, model=model, k=k)


def read_split(data_dir: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def print_answer(question: dict, answers: dict[str, str], documents: Sequence[tuple[str, str]]) -> None:
    """One held-out question: the answer of each mode, side by side, and the documents used."""
    from regrad_engine.chunking import chunk_source
    from regrad_engine.metrics import exact_match, first_line

    gold = "; ".join(question["answers"][:3])
    print(f"Q: {question['question']}\n   gold: {gold[:100]}")
    for mode, text in answers.items():
        mark = "OK " if exact_match(text, question["answers"]) else "   "
        print(f"   {mark}ReGrad {mode:<10s}: {first_line(text)}")  # the line that is scored
    print("   documents used:")
    for doc_id, text in documents:
        flag = " (gold)" if chunk_source(doc_id) == question["doc_id"] else ""
        print(f"     {doc_id}{flag}: {' '.join(text.split())[:80]}")
    print()


def score_table(model, meta: Path, data_dir: Path, *, limit: int, k: int, title: str) -> dict:
    """Exact match and token F1 on the first ``limit`` held-out questions, four systems."""
    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.evaluation import evaluate_systems, markdown_table, overall_scores

    print(f"held-out accuracy, {title}: first {limit} test questions, gold document among {k - 1} "
          "distractors from the test split (regrad_engine.evaluation)", flush=True)
    scores = overall_scores(evaluate_systems(model, MetaCheckpoint.load(meta), data_dir, split="test", k=k,
                                             limit=limit, systems=EVAL_SYSTEMS, progress=False, log=lambda _: None))
    print(markdown_table(scores) + "\n")
    return {name: s.as_dict() for name, s in scores.items()}


TRAIN_STEPS = 40  # what the shipped domain checkpoints were trained with (see examples/README.md)


def train_command(dataset: str, data_dir: str, run: str, checkpoint: str) -> str:
    """The exact commands that make a domain checkpoint, continued from the general one."""
    return (f"  python examples/datasets.py {dataset} --out {data_dir}\n"
            f"  regrad train --data {data_dir} --out {run} --init-from checkpoints/smollm2-135m-synth "
            f"--steps {TRAIN_STEPS} --tasks-per-step 2 --eval-every 20 --dev-size 16\n"
            f"  cp -r {run}/best checkpoints/{checkpoint}")
