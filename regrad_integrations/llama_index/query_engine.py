"""ReGradQueryEngine: a retriever's nodes, their gradients and one engine call per query (or batch)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.bridge.pydantic import Field, PrivateAttr, model_validator
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import NodeWithScore

from regrad_engine.errors import check_texts
from regrad_engine.retrieval.base import Hit
from regrad_integrations.llama_index._nodes import IdFn, node_hits, warn_if_mostly_on_the_fly
from regrad_integrations.llama_index.retriever import ReGradRetriever


class ReGradQueryEngine(CustomQueryEngine):
    """Answers queries with ReGrad: retrieved documents' gradients adapt the model per request.

    Example::

        query_engine = ReGradQueryEngine(engine=engine, mode="hybrid")
        response = query_engine.query("Where was Velmora Quistan born?")
        print(response, [n.node_id for n in response.source_nodes])
    """

    engine: Any = Field(description="The regrad_engine.ReGrad engine that does all the work.")
    retriever: BaseRetriever | None = Field(
        default=None, description="Any LlamaIndex retriever; default: ReGradRetriever(engine, k).")
    mode: Literal["parametric", "hybrid"] = Field(
        default="parametric", description="'parametric' (gradients only) or 'hybrid' (gradients + passages "
                                          "in the prompt).")
    k: int | None = Field(default=None, description="Documents per query for the default retriever "
                                                    "(default: the engine's k).")
    gamma: float | None = Field(default=None, description="Test-time step scale (default: the engine's).")
    max_new_tokens: int | None = Field(default=None, description="Answer length (default: the engine's).")
    streaming: bool = Field(default=False, description="Return a StreamingResponse.")
    id_fn: IdFn | None = Field(default=None, exclude=True, description="node -> bank id (default: ref_doc_id "
                                                                      "if the bank holds it, else node_id).")
    _warned_on_the_fly: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _default_retriever(self) -> ReGradQueryEngine:
        if self.retriever is None:
            self.retriever = ReGradRetriever(self.engine, k=self.k)
        return self

    def _generate_kwargs(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens is not None else {}

    def _hits(self, nodes: list[NodeWithScore]) -> list[Hit]:
        hits = node_hits(nodes, self.engine, self.id_fn)
        if not isinstance(self.retriever, ReGradRetriever):  # (that one warns itself)
            warn_if_mostly_on_the_fly(self, self.engine, hits)
        return hits

    def _response(self, text: str, nodes: list[NodeWithScore], hits: list[Hit]) -> Response:
        return Response(response=text, source_nodes=nodes, metadata={"mode": self.mode, "sources": [h.id for h in hits]})

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        check_texts([query_str])
        nodes = self.retriever.retrieve(query_str)
        hits = self._hits(nodes)
        if self.streaming:
            pieces = self.engine.stream(query_str, mode=self.mode, gamma=self.gamma, documents=hits,
                                        **self._generate_kwargs())
            return StreamingResponse(response_gen=pieces, source_nodes=nodes,
                                     metadata={"mode": self.mode, "sources": [h.id for h in hits]})
        answer = self.engine.answer_batch([query_str], mode=self.mode, gamma=self.gamma, documents=[hits],
                                          **self._generate_kwargs())[0]
        return self._response(answer.text, nodes, hits)

    async def acustom_query(self, query_str: str) -> Response | StreamingResponse:
        return await asyncio.to_thread(self.custom_query, query_str)

    def query_batch(self, queries: Sequence[str]) -> list[Response]:
        """Answer many queries with one batched generation (same answers as one at a time)."""
        for query_str in queries:
            check_texts([query_str])
        node_lists = [self.retriever.retrieve(q) for q in queries]
        documents = [self._hits(nodes) for nodes in node_lists]
        answers = self.engine.answer_batch(list(queries), mode=self.mode, gamma=self.gamma, documents=documents,
                                           **self._generate_kwargs())
        return [self._response(a.text, nodes, hits) for a, nodes, hits in zip(answers, node_lists, documents)]
