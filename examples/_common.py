"""What the example bots share: options, the meta checkpoint, the held-out store, the score table."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "regrad_engine" / "checkpoints"
GENERAL_META = CHECKPOINTS / "smollm2-135m-general"  # meta-trained on the real QA mix (`regrad data`)
FALLBACK_META = CHECKPOINTS / "smollm2-135m-synth"  # synthetic facts only
EVAL_SYSTEMS = ("direct", "rag", "regrad", "regrad_hybrid")


def rel(path: Path) -> str:
    """A path relative to the repository root when it is inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def add_arguments(parser: argparse.ArgumentParser, *, default_meta: Path, name: str) -> None:
    parser.add_argument("--meta", default=None,
                        help=f"meta checkpoint (default: {rel(default_meta)}, else {rel(FALLBACK_META)})")
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
    """The checkpoint to use: --meta, else the default one, else (with a note) the synthetic
    one. A training output directory is accepted too (its ``best/`` is used)."""
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
    print(f"note: no meta checkpoint at {rel(default)}; make it with\n{train_hint}")
    found = usable(FALLBACK_META)
    if found is None:
        print(f"error: no synthetic meta checkpoint at {rel(FALLBACK_META)} either: pass --meta DIR")
        return None
    print(f"note: falling back to {rel(FALLBACK_META)} "
          "(meta-trained on synthetic facts only: expect weaker answers on real questions)\n")
    return found


def write_data(data_dir: Path, sources: Sequence[str]) -> dict:
    """The held-out sets of these sources, exactly as split in the general meta-training mix
    (`regrad data`): the checkpoint never saw a test passage or question."""
    from regrad_engine.datasets.general import build_general

    info = build_general(data_dir, sources=sources, log=lambda _: None)
    for source in sources:
        kept = info["sources"][source]
        print(f"{source} data in {rel(data_dir)}: {kept['train']}/{kept['dev']}/{kept['test']} train/dev/test "
              "questions (split by source document, as in the general meta-training mix)")
    return info


def held_out_documents(data_dir: Path, max_docs: int | None) -> list[dict]:
    """The test split's passages, the gold passages of its questions first (so a small
    ``--max-docs`` store still answers questions), at most ``max_docs``."""
    from regrad_engine.datasets.converters import split_documents

    gold = {g for q in read_split(data_dir, "test") for g in q["gold_ids"]}
    docs = split_documents(data_dir, "test")
    return sorted(docs, key=lambda d: d["id"] not in gold)[:max_docs]


def stored_questions(data_dir: Path, stored: set[str], source: str | None = None) -> list[dict]:
    """Test questions whose gold passages are all in the store."""
    return [q for q in read_split(data_dir, "test")
            if set(q["gold_ids"]) <= stored and (source is None or q["source"] == source)]


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
    from regrad_engine.store import build_store, open_engine

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
    gold_ids = set(question.get("gold_ids") or [question.get("doc_id")])
    for doc_id, text in documents:
        flag = " (gold)" if doc_id in gold_ids or chunk_source(doc_id) in gold_ids else ""
        print(f"     {doc_id}{flag}: {' '.join(text.split())[:80]}")
    print()


def score_table(model, meta: Path, data_dir: Path, *, limit: int, k: int, title: str) -> dict:
    """Exact match and token F1 on the first ``limit`` held-out questions, four systems."""
    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.evaluation import (
        evaluate_systems,
        markdown_table,
        overall_scores,
    )

    print(f"held-out accuracy, {title}: first {limit} test questions, gold passage among BM25 hard negatives "
          f"from the test split, k={k} (regrad_engine.evaluation)", flush=True)
    scores = overall_scores(evaluate_systems(model, MetaCheckpoint.load(meta), data_dir, split="test", k=k,
                                             limit=limit, systems=EVAL_SYSTEMS, progress=False, log=lambda _: None))
    print(markdown_table(scores) + "\n")
    return {name: s.as_dict() for name, s in scores.items()}


def train_command() -> str:
    """The exact commands that make the general checkpoint (see its README)."""
    train = ("  regrad train --data runs/general --out runs/meta-16 --init-from regrad_engine/checkpoints/smollm2-135m-synth "
             "--mode mixed --steps 400 --tasks-per-step 16 --micro-batch 4 --lr 1e-3 --alpha-lr 0.05 "
             "--eval-every 10 --dev-size 32 --threads 2")
    return ("  regrad data --out runs/general\n"
            f"{train} --stop-after 120\n"
            f"{train} --cpu-bf16\n"
            "  mkdir -p regrad_engine/checkpoints/smollm2-135m-general\n"
            "  cp runs/meta-16/best/manifest.json runs/meta-16/best/meta.safetensors "
            "regrad_engine/checkpoints/smollm2-135m-general/")
