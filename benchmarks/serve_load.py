"""Throughput of ``regrad serve``: N concurrent requests against the same N one at a time.

    python benchmarks/serve_load.py [--store DIR] [--requests 64] [--max-tokens 12] [--threads 2]

Without ``--store``, a store over held-out synthetic documents is built in a temporary
directory on the embedded model with the shipped synthetic meta checkpoint (as ``regrad
demo`` does), and the questions are the synthetic test questions about those documents.
With ``--store DIR``, questions come from ``--questions FILE`` (one per line) or are made
from the store's documents. The server runs in-process on 127.0.0.1; the requests go through
the official ``openai`` client: first one at a time (each generates alone), then all at once
(the server batches them). Prints requests/s both ways, the ratio, the CPU time of this
process for each run (less sensitive than wall time to other work on a shared machine; the
load average is printed too), the batch sizes, and whether every concurrent answer equals
its sequential one (exit status 1 if not).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def synthetic_store(workdir: Path, num_docs: int):
    """A store over held-out synthetic documents and the test questions about them."""
    from regrad_engine.checkpoint import shipped_checkpoint
    from regrad_engine.chunking import chunk_documents
    from regrad_engine.datasets.synthetic import generate_corpus
    from regrad_engine.demo import DEFAULT_META
    from regrad_engine.models import load_model
    from regrad_engine.store import build_store

    model = load_model()
    corpus = generate_corpus(600, seed=0)  # the shipped checkpoint was meta-trained on its train split
    held_out = sorted({qa.doc_id for qa in corpus.test})[:num_docs]
    by_id = corpus.documents_by_id()
    docs = [{"id": d, "text": by_id[d]["text"], "title": by_id[d]["title"]} for d in held_out]
    chunks = chunk_documents(docs, model.tokenizer, max_tokens=200)
    start = time.perf_counter()
    build_store(workdir / "store", chunks, model=model, meta_path=str(shipped_checkpoint(DEFAULT_META)),
                progress=False)
    print(f"built a store of {len(chunks)} documents in {time.perf_counter() - start:.0f} s", flush=True)
    questions = [qa.question for qa in corpus.test if qa.doc_id in set(held_out)]
    return workdir / "store", model, questions


def store_questions(engine, path: str | None) -> list[str]:
    if path:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    ids = engine.retriever.ids()
    return [f"What does this say: {' '.join(engine.retriever.get(i).text.split()[:10])}?" for i in ids]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=None, help="store directory (default: build a synthetic one)")
    parser.add_argument("--questions", default=None, help="questions file for --store, one per line")
    parser.add_argument("--requests", type=int, default=64, help="requests per run")
    parser.add_argument("--max-tokens", type=int, default=12, help="answer length of every request")
    parser.add_argument("--max-batch", type=int, default=None, help="server's batch limit (default: engine's, 16)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--mode", default="parametric", choices=["parametric", "hybrid"])
    parser.add_argument("--num-docs", type=int, default=24, help="documents of the synthetic store")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import torch
    from openai import OpenAI

    from regrad_engine.server import create_app, serving
    from regrad_engine.store import open_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.store:
            engine = open_engine(args.store, device=args.device)
            questions = store_questions(engine, args.questions)
        else:
            store, model, questions = synthetic_store(Path(tmp), args.num_docs)
            engine = open_engine(store, model=model, device=args.device)
        questions = (questions * (args.requests // max(len(questions), 1) + 1))[:args.requests]
        app = create_app(engine, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
        with serving(app) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

            def send(question: str) -> tuple[str, list]:
                response = client.chat.completions.create(
                    model="regrad", messages=[{"role": "user", "content": question}], max_tokens=args.max_tokens,
                    extra_body={"mode": args.mode})
                return response.choices[0].message.content, response.model_extra["sources"]

            send(questions[0])  # warm-up
            stats = app.state.batcher.stats
            start, cpu = time.perf_counter(), time.process_time()
            sequential = [send(q) for q in questions]
            one_at_a_time, cpu_alone = time.perf_counter() - start, time.process_time() - cpu
            before = dict(stats.sizes)
            start, cpu = time.perf_counter(), time.process_time()
            with ThreadPoolExecutor(max_workers=len(questions)) as pool:
                concurrent = list(pool.map(send, questions))
            together, cpu_together = time.perf_counter() - start, time.process_time() - cpu
            sizes = {size: count - before.get(size, 0) for size, count in sorted(stats.sizes.items())
                     if count != before.get(size, 0)}
    n = len(questions)
    same = sum(a == b for a, b in zip(sequential, concurrent))
    print(f"{n} requests, {args.max_tokens} new tokens at most, mode {args.mode}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, load average at the end {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"one at a time: {n / one_at_a_time:.2f} requests/s ({one_at_a_time:.1f} s; CPU {cpu_alone:.1f} s)")
    print(f"concurrent:    {n / together:.2f} requests/s ({together:.1f} s; CPU {cpu_together:.1f} s), "
          f"batch sizes {sizes}")
    print(f"ratio:         {one_at_a_time / together:.2f}x requests/s, {cpu_alone / cpu_together:.2f}x less CPU time")
    print(f"concurrent answers equal to the sequential ones: {same}/{n}")
    for i, (a, b) in enumerate(zip(sequential, concurrent)):
        if a != b:
            print(f"  differs: {questions[i]!r}: alone {a[0]!r}, batched {b[0]!r}")
    return 0 if same == n else 1


if __name__ == "__main__":
    sys.exit(main())
