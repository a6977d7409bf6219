"""A medical QA bot: a LangChain RAG chain whose retriever and LLM are ReGrad's (PubMedQA).

One command on a CPU:

    python examples/medical_bot.py                  # --questions 4 --limit 100

1. writes the PubMedQA data directory (runs/examples/medical/data): PubMedQA exactly as split
   in the general meta-training mix (`regrad data`; test = a seeded sample of 200 official
   test questions, never trained on);
2. builds a ReGrad store (BM25 index + Gradient Bank) over the *test* passages only, with
   the general meta checkpoint (regrad_engine/checkpoints/smollm2-135m-general; without it, the synthetic
   one);
3. answers a few held-out questions with the usual LangChain chain
   ``{"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm``,
   once with ``llm.bind(mode="parametric")`` (the documents' gradients only: their text is cut
   from the prompt) and once with ``mode="hybrid"`` (gradients + passages);
4. prints held-out exact match / F1 of the base model, RAG, ReGrad and ReGrad hybrid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the examples as a package, not as top-level modules
    _root = Path(__file__).resolve().parents[1]
    sys.path[:] = [str(_root)] + [p for p in sys.path if Path(p or ".").resolve() != _root / "examples"]

from examples import _common  # noqa: E402

DEFAULT_META = _common.GENERAL_META
TRAIN_COMMAND = _common.train_command()

# The chain's prompt: the wording ReGrad was meta-trained with (passages, then the question).
PROMPT = "Context:\n{context}\n\nQuestion: {question}\nAnswer with a short phrase only."


def format_docs(docs) -> str:
    return "\n\n".join(doc.page_content for doc in docs)


def make_chain(retriever, llm):
    """A standard LangChain RAG chain; nothing in it is ReGrad-specific but the two objects."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import PromptTemplate
    from langchain_core.runnables import RunnablePassthrough

    prompt = PromptTemplate.from_template(PROMPT)
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _common.add_arguments(parser, default_meta=DEFAULT_META, name="medical")
    args = parser.parse_args(argv)
    try:
        from regrad_integrations.langchain import regrad_langchain
    except ImportError as err:
        print(f"error: {err}")
        return 2

    workdir = Path(args.workdir)
    data_dir = workdir / "data"
    _common.write_data(data_dir, ("pubmedqa",))
    meta = _common.resolve_meta(args.meta, DEFAULT_META, TRAIN_COMMAND)
    if meta is None:
        return 2
    print(f"meta checkpoint: {meta}", flush=True)
    model = _common.load(args)

    documents = _common.held_out_documents(data_dir, args.max_docs)
    engine = _common.open_held_out_store(workdir, documents, model, meta, k=args.k)
    stored = {d["id"] for d in documents}
    asked = _common.stored_questions(data_dir, stored)[:args.questions]

    llm, retriever = regrad_langchain(engine, k=args.k)
    questions = [q["question"] for q in asked]
    answers = {mode: make_chain(retriever, llm.bind(mode=mode)).batch(questions)
               for mode in ("parametric", "hybrid")}
    used = retriever.batch(questions)  # the documents the chain retrieved (BM25 is deterministic)
    print(f"--- {len(asked)} held-out questions through the LangChain chain ---\n")
    for i, question in enumerate(asked):
        _common.print_answer(question, {mode: answers[mode][i] for mode in answers},
                             [(doc.id, doc.page_content) for doc in used[i]])

    if args.limit:
        _common.score_table(model, meta, data_dir, limit=args.limit, k=args.k, title="PubMedQA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
