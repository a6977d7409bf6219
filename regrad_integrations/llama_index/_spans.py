"""The run tree of a LlamaIndex query: which nodes an LLM call belongs to (see ``_handoff``).

One span handler on LlamaIndex's root dispatcher (added on first use) records every span's
parent and hands nodes to the spans above the step that produced them:

* a retriever's ``RetrievalEndEvent`` (any retriever; the outermost one when retrievers
  nest, since its list is the one the pipeline gets) hands its nodes to its span and every
  span above it;
* a synthesizer's ``synthesize(query, nodes)`` hands over the nodes it answers from (after
  postprocessors), nearer to the LLM than the retrieval;
* an LLM call takes the nodes of the nearest span above it that holds some.

A streamed answer is generated when it is read, after the query's spans have ended: the
synthesizer's response stream is wrapped so that its nodes are in the context
(:func:`streamed_nodes`) while it is read. Spans follow the context, so threads started by
LlamaIndex, ``asyncio.to_thread`` and tasks stay in their query's tree, and two queries
are two trees.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.response_synthesizers.base import BaseSynthesizer
from llama_index.core.schema import NodeWithScore

from regrad_integrations._handoff import RunScopes


class RunTree(BaseSpanHandler):
    """Span handler: span parents, the nodes handed to each span, and which spans were
    called by hand (a root span, and the spans of the same object below it)."""

    _scopes: RunScopes = PrivateAttr(default_factory=RunScopes)
    _retrieving: dict = PrivateAttr(default_factory=dict)  # span inside a retriever -> under another one
    _by_hand: dict = PrivateAttr(default_factory=dict)  # span -> its object, for calls made by hand
    _mutex: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def new_span(self, id_: str, bound_args: Any, instance: Any = None, parent_span_id: str | None = None,
                 tags: Any = None, **kwargs: Any) -> None:
        self._scopes.started(id_, parent_span_id)
        with self._mutex:
            nested = parent_span_id in self._retrieving
            if nested or isinstance(instance, BaseRetriever):
                self._retrieving[id_] = nested
            if instance is not None and (parent_span_id is None or self._by_hand.get(parent_span_id) is instance):
                self._by_hand[id_] = instance
        if isinstance(instance, BaseSynthesizer):
            nodes = bound_args.arguments.get("nodes")
            if nodes and all(isinstance(n, NodeWithScore) for n in nodes):
                self._scopes.add(id_, nodes, key=_node_key)
        return None

    def prepare_to_exit_span(self, id_: str, bound_args: Any, instance: Any = None, result: Any = None,
                             **kwargs: Any) -> None:
        if isinstance(instance, BaseSynthesizer) and isinstance(result, (StreamingResponse, AsyncStreamingResponse)):
            nodes = bound_args.arguments.get("nodes")
            if nodes and result.response_gen is not None:
                result.response_gen = _reading_with(result.response_gen, list(nodes))
        self._end(id_)

    def prepare_to_drop_span(self, id_: str, bound_args: Any, instance: Any = None, err: Any = None,
                             **kwargs: Any) -> None:
        self._end(id_)

    def _end(self, span: str) -> None:
        self._scopes.ended(span)
        with self._mutex:
            self._retrieving.pop(span, None)
            self._by_hand.pop(span, None)

    def retrieved(self, span: str | None, nodes: list[NodeWithScore]) -> None:
        """A retriever running as ``span`` returned ``nodes``."""
        with self._mutex:
            if span is None or self._retrieving.get(span):
                return  # the enclosing retriever hands over the list it returns
            owner = self._by_hand.get(span)
        self._scopes.add(span, nodes, key=_node_key)
        retrieved_by_hand = getattr(owner, "retrieved_by_hand", None)
        if retrieved_by_hand is not None:  # (a ReGradRetriever: only the text can tie these to a prompt)
            retrieved_by_hand(nodes)

    def documents(self) -> tuple[list[NodeWithScore] | None, bool]:
        """For a call in the current span: the nodes handed to it or to the nearest span
        above it that holds some (else those of the answer being streamed, else None), and
        whether it was made by hand, outside any pipeline (or in a tree begun before this
        handler was added)."""
        span = active_span_id.get()
        nodes = self._scopes.find(span)
        with self._mutex:
            by_hand = span is None or span in self._by_hand
        if nodes is None:
            nodes = _streamed_nodes.get()
        return nodes, nodes is None and (by_hand or not self._scopes.known(span))


class _RetrievalHandOff(BaseEventHandler):
    @classmethod
    def class_name(cls) -> str:
        return "ReGradRetrievalHandOff"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, RetrievalEndEvent) and _tree is not None:
            _tree.retrieved(event.span_id, list(event.nodes))


def _node_key(node: NodeWithScore) -> str:
    return node.node.node_id


_streamed_nodes: ContextVar[list[NodeWithScore] | None] = ContextVar("regrad_streamed_nodes", default=None)


def _reading_with(pieces: Any, nodes: list[NodeWithScore]) -> Any:
    """``pieces`` (a sync or async token stream) with ``nodes`` in the context at each step."""
    if hasattr(pieces, "__anext__"):
        async def read_async() -> AsyncIterator[str]:
            while True:
                token = _streamed_nodes.set(nodes)
                try:
                    piece = await pieces.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    _streamed_nodes.reset(token)
                yield piece

        return read_async()

    def read() -> Iterator[str]:
        while True:
            token = _streamed_nodes.set(nodes)
            try:
                piece = next(pieces)
            except StopIteration:
                return
            finally:
                _streamed_nodes.reset(token)
            yield piece

    return read()


_tree: RunTree | None = None
_tree_lock = threading.Lock()


def run_tree() -> RunTree:
    """The span handler, added once to LlamaIndex's root dispatcher on first use."""
    global _tree
    if _tree is None:
        with _tree_lock:
            if _tree is None:
                tree = RunTree()
                dispatcher = get_dispatcher()
                dispatcher.add_span_handler(tree)
                dispatcher.add_event_handler(_RetrievalHandOff())
                _tree = tree
    return _tree
