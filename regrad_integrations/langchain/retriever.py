"""ReGradRetriever: the engine's index (or any retriever) whose documents the paired LLM adapts to."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import Field

from regrad_engine.errors import check_k
from regrad_engine.inference import ReGrad
from regrad_engine.retrieval.base import Hit
from regrad_integrations.langchain._base import (
    document_to_hit,
    hand_over,
    hit_to_document,
    track_runs,
)


class ReGradRetriever(BaseRetriever):
    """Retriever whose documents a :class:`ReGradLLM` or :class:`ChatReGrad` over the same
    engine adapts to, in the same invocation.

    Documents come from the engine's own index, or from ``base_retriever`` (any LangChain
    retriever). A document's id is ``metadata[id_key]``, else ``Document.id``, else the sha1
    of its text; a document whose gradient is not in the bank gets it computed on the fly
    (the engine's ``on_the_fly`` setting). The documents are handed to the LLM through the
    invocation's run tree, however ``format_docs`` writes them into the prompt.
    """

    engine: ReGrad = Field(exclude=True, description="The ReGrad engine (index, bank, model).")
    k: int = Field(3, ge=1, description="Documents per query; also caps base_retriever's list.")
    base_retriever: BaseRetriever | None = Field(None, description="Another retriever to take documents from.")
    id_key: str = Field("id", description="Metadata key holding the id of base_retriever's documents.")

    def model_post_init(self, context: Any) -> None:
        track_runs()

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        k = self._check_k(k)
        if self.base_retriever is None:
            return self._documents(self.engine.retrieve([query], k)[0], run_manager)
        docs = self.base_retriever.invoke(query, config={"callbacks": run_manager.get_child()})
        return self._documents([document_to_hit(doc, self.id_key) for doc in docs[:k]], run_manager)

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: int | None = None) -> list[Document]:
        k = self._check_k(k)
        if self.base_retriever is None:
            hits = (await asyncio.to_thread(self.engine.retrieve, [query], k))[0]
            return self._documents(hits, run_manager)
        docs = await self.base_retriever.ainvoke(query, config={"callbacks": run_manager.get_child()})
        return self._documents([document_to_hit(doc, self.id_key) for doc in docs[:k]], run_manager)

    def _check_k(self, k: int | None) -> int:
        return check_k(self.k if k is None else k)

    def _documents(self, hits: Sequence[Hit], run_manager: Any) -> list[Document]:
        hand_over(self.engine, run_manager.parent_run_id, hits)
        return [hit_to_document(h) for h in hits]
