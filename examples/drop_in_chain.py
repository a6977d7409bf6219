"""Drop ReGrad into an existing LangChain RAG chain: swap the retriever and the LLM, nothing else.

    python examples/drop_in_chain.py

The chain below (``make_chain``) is an ordinary RAG chain. It runs three times on the same
held-out PubMedQA questions:

1. as it was: a keyword retriever over the documents and a local LLM (the plain base model),
   both stand-ins for whatever the app used before (a vector store, a chat model);
2. with ReGrad's retriever and LLM: ``llm, retriever = regrad_langchain(engine)``;
3. keeping the app's own retriever: ``ReGradRetriever(engine=..., base_retriever=yours)``
   (documents missing from the Gradient Bank get their gradient computed on the fly).

With ``mode="parametric"`` the ReGrad LLM cuts the retrieved passages out of the rendered
prompt and answers from their gradients; ``mode="hybrid"`` keeps them in the prompt.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the examples as a package, not as top-level modules
    _root = Path(__file__).resolve().parents[1]
    sys.path[:] = [str(_root)] + [p for p in sys.path if Path(p or ".").resolve() != _root / "examples"]

from langchain_core.documents import Document  # noqa: E402
from langchain_core.language_models.llms import LLM  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import PromptTemplate  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_core.runnables import RunnablePassthrough  # noqa: E402

from examples import _common, datasets, medical_bot  # noqa: E402


# ---------------------------------------------------------------- the existing app's chain
def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(doc.page_content for doc in docs)


def make_chain(retriever, llm):
    prompt = PromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}\nAnswer with a short phrase only.")
    return {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()


# ---------------------------------------------------------------- stand-ins for the app's own objects
class KeywordRetriever(BaseRetriever):
    """Stand-in for the app's retriever (a vector store, Elasticsearch, ...): word overlap."""

    documents: list[Document]
    k: int = 3

    def _get_relevant_documents(self, query: str, *, run_manager=None) -> list[Document]:
        words = set(query.lower().split())
        ranked = sorted(self.documents, key=lambda d: -len(words & set(d.page_content.lower().split())))
        return ranked[:self.k]


class LocalLLM(LLM):
    """Stand-in for the app's LLM: the plain base model, greedy."""

    model: object
    max_new_tokens: int = 20

    @property
    def _llm_type(self) -> str:
        return "local"

    def _call(self, prompt: str, stop=None, run_manager=None, **kwargs) -> str:
        import torch

        from regrad_engine.prompts import turn_marker_ids

        tokenizer = self.model.tokenizer
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = self.model.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                            eos_token_id=turn_marker_ids(tokenizer))
        return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meta", default=None, help="meta checkpoint (default: the shipped general one)")
    parser.add_argument("--model", default=None, help="base model directory (default: the embedded SmolLM2)")
    parser.add_argument("--workdir", default=str(_common.ROOT / "runs" / "examples" / "drop_in"))
    parser.add_argument("--docs", type=int, default=20, help="held-out PubMedQA abstracts in the store")
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    from regrad_engine.metrics import first_line
    from regrad_integrations.langchain import ReGradRetriever, regrad_langchain

    workdir = Path(args.workdir)
    datasets.pubmedqa(workdir / "data")
    meta = _common.resolve_meta(args.meta, medical_bot.DEFAULT_META, medical_bot.TRAIN_COMMAND)
    if meta is None:
        return 2
    model = _common.load(args)
    docs = datasets.split_documents(workdir / "data", "test")[:args.docs]
    questions = [q["question"] for q in _common.read_split(workdir / "data", "test")
                 if q["doc_id"] in {d["id"] for d in docs}][:args.questions]

    # 1. the existing chain
    my_retriever = KeywordRetriever(documents=[Document(page_content=d["text"], metadata={"id": d["id"]}) for d in docs])
    my_llm = LocalLLM(model=model)
    before = make_chain(my_retriever, my_llm).batch(questions)

    # 2. the same chain with ReGrad's retriever and LLM
    engine = _common.open_held_out_store(workdir, docs, model, meta, k=3)
    llm, retriever = regrad_langchain(engine, mode="parametric", k=3)
    after = make_chain(retriever, llm).batch(questions)

    # 3. keep the app's retriever, add ReGrad's gradients (gradients computed on the fly)
    kept = make_chain(ReGradRetriever(engine=engine, base_retriever=my_retriever, k=3), llm).batch(questions)

    for question, *answers in zip(questions, before, after, kept):
        a, b, c = (first_line(text) for text in answers)
        print(f"Q: {question}\n   existing chain                  : {a}\n   ReGrad chain (parametric)       : {b}"
              f"\n   ReGrad chain, existing retriever: {c}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
