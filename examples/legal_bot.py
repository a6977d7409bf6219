"""A legal QA bot: a LlamaIndex query engine answering with ReGrad (CUAD contracts + PolicyQA).

One command on a CPU:

    python examples/legal_bot.py                    # --questions 4 --limit 100

1. writes two data directories under runs/examples/legal/data: ``cuad`` (contract clauses:
   governing law, parties, dates; split by contract) and ``policyqa`` (privacy-policy
   paragraphs; split by policy), exactly as split in the general meta-training mix;
2. builds one ReGrad store (BM25 index + Gradient Bank) over the *test* passages of both,
   with the general meta checkpoint (regrad_engine/checkpoints/smollm2-135m-general; without it, the
   synthetic one);
3. answers a few held-out questions with ``ReGradQueryEngine`` in both modes: ``parametric``
   (the retrieved documents' gradients only, the prompt holds just the question) and
   ``hybrid`` (gradients + passages), printing the source nodes of each response;
4. prints held-out exact match / F1 of the base model, RAG, ReGrad and ReGrad hybrid on each set.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the examples as a package, not as top-level modules
    _root = Path(__file__).resolve().parents[1]
    sys.path[:] = [str(_root)] + [p for p in sys.path if Path(p or ".").resolve() != _root / "examples"]

from examples import _common  # noqa: E402

DEFAULT_META = _common.GENERAL_META
TRAIN_COMMAND = _common.train_command()
SETS = (("CUAD", "cuad"), ("PolicyQA", "policyqa"))


def pick_questions(rows: list[dict], n: int, key) -> list[dict]:
    """n questions, taking turns between the groups of ``key`` (e.g. CUAD's clause categories)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    turns = itertools.chain.from_iterable(itertools.zip_longest(*groups.values()))
    return [row for row in turns if row is not None][:n]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _common.add_arguments(parser, default_meta=DEFAULT_META, name="legal")
    args = parser.parse_args(argv)
    try:
        from regrad_integrations.llama_index import ReGradQueryEngine
    except ImportError as err:
        print(f"error: {err}")
        return 2

    workdir = Path(args.workdir)
    documents, asked = [], []
    for number, (title, name) in enumerate(SETS):
        data_dir = workdir / "data" / name
        _common.write_data(data_dir, (name,))
        docs = _common.held_out_documents(data_dir, args.max_docs)
        stored = {d["id"] for d in docs}
        rows = _common.stored_questions(data_dir, stored)
        share = (args.questions + 1 - number) // 2  # CUAD gets the odd one
        asked += pick_questions(rows, share, key=lambda row: row["id"].split("-", 1)[-1] if name == "cuad" else "")
        documents += docs
    meta = _common.resolve_meta(args.meta, DEFAULT_META, TRAIN_COMMAND)
    if meta is None:
        return 2
    print(f"meta checkpoint: {meta}", flush=True)
    model = _common.load(args)
    engine = _common.open_held_out_store(workdir, documents, model, meta, k=args.k)

    query_engines = {mode: ReGradQueryEngine(engine=engine, mode=mode, k=args.k) for mode in ("parametric", "hybrid")}
    print(f"--- {len(asked)} held-out questions through the LlamaIndex query engine ---\n")
    for question in asked:
        responses = {mode: qe.query(question["question"]) for mode, qe in query_engines.items()}
        nodes = responses["parametric"].source_nodes
        _common.print_answer(question, {mode: str(r) for mode, r in responses.items()},
                             [(n.node_id, n.get_content()) for n in nodes])

    if args.limit:
        for title, name in SETS:
            _common.score_table(model, meta, workdir / "data" / name, limit=args.limit, k=args.k, title=title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
