"""Latency, cost and throughput of ReGrad against direct generation and RAG, in one run.

    python benchmarks/latency.py [--meta regrad_engine/checkpoints/smollm2-135m-synth] [--device cuda] [--repeats 5]

Documents are ~200-token chunks of SQuAD 2.0 paragraphs from ../shared/data (as in the
paper's setting of ~200-token passages). Every generation is forced to the same length
(min = max new tokens) so the timings compare the same work. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SQUAD = ROOT.parent / "shared" / "data" / "general" / "squad2_devhalf" / "dev-v2.0.json"


def timed(fn, repeats: int, device) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def squad_passages_and_questions(limit: int, path: Path = SQUAD):
    data = json.loads(Path(path).read_text())["data"]
    paragraphs, questions = [], []
    for article in data:
        for para in article["paragraphs"]:
            answerable = [q for q in para["qas"] if not q.get("is_impossible")]
            if answerable:
                paragraphs.append(para["context"])
                questions.append(answerable[0]["question"])
    return paragraphs[:limit], questions[:limit]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta", default=str(ROOT / "regrad_engine" / "checkpoints" / "smollm2-135m-synth"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--squad", default=str(SQUAD), help="SQuAD 2.0 dev JSON (passages and questions)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from regrad_engine.chunking import chunk_documents
    from regrad_engine.models import load_model
    from regrad_engine.store import build_store, open_engine

    device = torch.device(args.device)
    model = load_model(device=device, dtype=getattr(torch, args.dtype))
    paragraphs, questions = squad_passages_and_questions(200, args.squad)
    # Consecutive paragraphs joined and cut into 200-token chunks; keep only full-size ones.
    docs = [{"id": f"p{i}", "text": " ".join(paragraphs[i:i + 3])} for i in range(0, len(paragraphs), 3)]
    chunks = [c for c in chunk_documents(docs, model.tokenizer, max_tokens=200)
              if len(model.tokenizer(c.text)["input_ids"]) >= 180][:48]
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        stats = build_store(Path(tmp) / "store", chunks, model=model, meta_path=args.meta, progress=False)
        engine = open_engine(Path(tmp) / "store", model=model, device=args.device, max_new_tokens=args.new_tokens)
        tokens = [len(model.tokenizer(c.text)["input_ids"]) for c in chunks]
        gen = {"min_new_tokens": args.new_tokens}
        q = questions[0]
        docs3 = [engine.retriever.get(c.id) for c in chunks[:3]]  # three full 200-token passages
        passages = [h.text for h in docs3]

        direct = timed(lambda: engine.generate([q], None, None, **gen), args.repeats, device)
        cached = timed(lambda: engine.answer(q, k=3, **gen), args.repeats, device)
        fetch_apply = timed(lambda: engine.adapted_factors([docs3], 1.0), args.repeats, device)
        rag = timed(lambda: engine.generate([q], [passages], None, **gen), args.repeats, device)
        hybrid = timed(lambda: engine.answer(q, k=3, mode="hybrid", **gen), args.repeats, device)
        engine.bank, engine.on_the_fly = None, True  # every gradient computed per request
        on_the_fly = timed(lambda: engine.answer(q, documents=docs3, **gen), args.repeats, device)
        one_doc = timed(lambda: engine.document_gradients(docs3[:1]), args.repeats, device)
        engine.bank = open_engine(Path(tmp) / "store", model=model, device=args.device).bank
        engine.on_the_fly = False

        batch_q = questions[:16]
        batch_docs = [[engine.retriever.get(chunks[(3 * i + j) % len(chunks)].id) for j in range(3)] for i in range(16)]
        engine.batch_size = 16
        one_at_a_time = timed(lambda: [engine.answer(bq, documents=bd, **gen) for bq, bd in zip(batch_q, batch_docs)],
                              max(1, args.repeats // 2), device)
        batched = timed(lambda: engine.answer_batch(batch_q, documents=batch_docs, **gen), max(1, args.repeats // 2), device)

        rows += [
            ("direct generation (question only)", f"{1000 * direct:.0f} ms"),
            ("ReGrad cached gradients, k=3 (retrieve + fetch + apply + generate)", f"{1000 * cached:.0f} ms  ({cached / direct:.2f}x direct, {cached / rag:.2f}x RAG)"),
            ("RAG, 3 passages in the prompt", f"{1000 * rag:.0f} ms  (passages of {', '.join(str(t) for t in tokens[:3])} tokens)"),
            ("ReGrad hybrid (gradients + passages)", f"{1000 * hybrid:.0f} ms"),
            ("ReGrad computing the 3 gradients on the fly", f"{1000 * on_the_fly:.0f} ms  ({on_the_fly / direct:.2f}x direct)"),
            ("fetch 3 gradients from the bank + apply", f"{1000 * fetch_apply:.1f} ms"),
            ("one document gradient (batch of 1)", f"{1000 * one_doc:.0f} ms"),
            ("bank build, batches of 8", f"{stats.ms_per_document:.0f} ms/document over {stats.added} documents"),
            ("bytes per document (bf16)", f"{engine.bank.nbytes_per_document():,} B ({engine.space.num_parameters:,} numbers)"),
            ("16 questions, one at a time", f"{16 / one_at_a_time:.2f} questions/s"),
            ("16 questions, one batch (each its own documents)", f"{16 / batched:.2f} questions/s  ({one_at_a_time / batched:.2f}x)"),
        ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ndevice: {name}; model: SmolLM2-135M-Instruct ({args.dtype}); {args.new_tokens} new tokens per answer; "
          f"median of {args.repeats}\n")
    print("| measurement | value |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
