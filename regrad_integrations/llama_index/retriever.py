"""ReGradRetriever: nodes from the engine's index, or any LlamaIndex retriever's, with their bank ids."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle

from regrad_engine.errors import check_k, check_texts
from regrad_engine.retrieval.base import Hit
from regrad_integrations._registry import registry_for
from regrad_integrations.llama_index._nodes import (
    IdFn,
    bank_id,
    hit_to_node,
    node_hits,
    warn_if_mostly_on_the_fly,
    with_bank_id,
)
from regrad_integrations.llama_index._spans import run_tree


class ReGradRetriever(BaseRetriever):
    """Nodes whose gradients a ReGrad LLM or query engine applies.

    Nodes come from the engine's own index (BM25, Elasticsearch, ...), or from
    ``base_retriever`` (any LlamaIndex retriever, e.g. ``index.as_retriever()``), returned
    as copies that carry their bank id in ``metadata["regrad_id"]`` (hidden from prompts
    and embeddings). Warns (``OnTheFlyWarning``) once when most of a query's gradients are
    not in the bank.

    Args:
        engine: A :class:`regrad_engine.ReGrad`.
        k: Nodes per query (default: the engine's ``k``; with ``base_retriever``: all it returns).
        base_retriever: Another retriever to take nodes from.
        id_fn: ``node -> bank id`` (default: ``ref_doc_id`` if the bank holds it, else ``node_id``).
        callback_manager: LlamaIndex callback manager.
    """

    def __init__(self, engine: Any, k: int | None = None, base_retriever: BaseRetriever | None = None,
                 id_fn: IdFn | None = None, callback_manager: CallbackManager | None = None) -> None:
        super().__init__(callback_manager=callback_manager)
        self.engine, self.base_retriever, self.id_fn = engine, base_retriever, id_fn
        self.k = None if k is None and base_retriever is not None else check_k(engine.k if k is None else k)
        self._warned_on_the_fly = False
        run_tree()

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        check_texts([query_bundle.query_str])  # before a foreign retriever or embedder sees it
        if self.base_retriever is None:
            return self._own(self.engine.retrieve([query_bundle.query_str], self.k)[0])
        return self._mapped(self.base_retriever.retrieve(query_bundle))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        check_texts([query_bundle.query_str])
        if self.base_retriever is None:
            return self._own((await asyncio.to_thread(self.engine.retrieve, [query_bundle.query_str], self.k))[0])
        return self._mapped(await self.base_retriever.aretrieve(query_bundle))

    def _own(self, hits: list[Hit]) -> list[NodeWithScore]:
        warn_if_mostly_on_the_fly(self, self.engine, hits)
        return [hit_to_node(hit) for hit in hits]

    def _mapped(self, nodes: list[NodeWithScore]) -> list[NodeWithScore]:
        nodes = nodes[:self.k] if self.k is not None else nodes
        mapped = [with_bank_id(n, bank_id(n, self.engine, self.id_fn)) for n in nodes]
        warn_if_mostly_on_the_fly(self, self.engine, node_hits(mapped, self.engine))
        return mapped

    def retrieved_by_hand(self, nodes: list[NodeWithScore]) -> None:
        """Called for a retrieval outside any pipeline: a :class:`ReGradLLM` called by hand
        can then recognise these nodes' text in its prompt (the fallback)."""
        registry_for(self.engine).register(node_hits(nodes, self.engine, self.id_fn))
