"""LangChain adapters: swap the retriever and the model of a RAG chain for ReGrad's.

The usual chain keeps its shape::

    chat, retriever = regrad_langchain(engine)          # ChatReGrad + ReGradRetriever
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | chat

:class:`ReGradRetriever` returns the engine's documents (or another retriever's) and hands
them to the model of the same invocation through its run tree; :class:`ChatReGrad` (chat
messages) and :class:`ReGradLLM` (a text prompt) apply exactly those documents' gradients,
with no second retrieval. Parallel invocations, ``batch``, ``abatch`` and threads cannot mix
documents, and two chains on one engine cannot see each other's. In ``parametric`` mode
the documents' text is cut out of what the model reads; in ``hybrid`` mode it stays.
"""

from __future__ import annotations

try:
    import langchain_core  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised with langchain-core hidden
    raise ImportError("the LangChain adapter needs langchain-core: pip install 'regrad[langchain]'") from err

from typing import Literal

from regrad_engine.inference import ReGrad
from regrad_integrations._handoff import NoDocumentsWarning
from regrad_integrations.langchain.chat import ChatReGrad
from regrad_integrations.langchain.llm import ReGradLLM
from regrad_integrations.langchain.retriever import ReGradRetriever

__all__ = ["ChatReGrad", "NoDocumentsWarning", "ReGradLLM", "ReGradRetriever", "regrad_langchain"]


def regrad_langchain(engine: ReGrad, *, mode: Literal["parametric", "hybrid"] = "parametric", k: int = 3,
                     chat: bool = False) -> tuple[ChatReGrad | ReGradLLM, ReGradRetriever]:
    """The model and retriever to put in a LangChain RAG chain in place of the usual pair:
    a :class:`ChatReGrad` with ``chat=True``, else a :class:`ReGradLLM`."""
    model = ChatReGrad(engine=engine, mode=mode) if chat else ReGradLLM(engine=engine, mode=mode)
    return model, ReGradRetriever(engine=engine, k=k)
