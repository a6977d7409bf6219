"""LlamaIndex adapters for a ReGrad engine: a retriever, a query engine and an LLM.

* :class:`ReGradLLM` is the engine as a LlamaIndex chat LLM. Put it in any pipeline
  (``index.as_query_engine(llm=...)``, ``Settings.llm``, ``RetrieverQueryEngine``, chat
  engines): every call gets the gradients of the nodes its own query retrieved. Those nodes
  reach it through the run's span tree (see ``_handoff``), never through other queries; in
  ``parametric`` mode their text is cut out of the prompt first.
* :class:`ReGradRetriever` returns the engine index's documents, or any LlamaIndex
  retriever's nodes (``base_retriever``) mapped to their ids in the bank.
* :class:`ReGradQueryEngine` answers from a retriever's nodes in one engine call, batched
  with ``query_batch``.

A node's id in the bank is, in this order: the ``regrad_id`` metadata a
:class:`ReGradRetriever` puts on it, ``id_fn(node)`` if given, its ``ref_doc_id`` (the
LlamaIndex ``Document.id_``) if the bank holds it, else its ``node_id``. A node whose
gradient is not in the bank gets it computed on the fly (slow; a warning says so).

Every computation happens in the engine (:class:`regrad_engine.ReGrad`); these classes
only translate between LlamaIndex objects and the engine's calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Literal

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
    )
    from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
    from llama_index.core.bridge.pydantic import Field, PrivateAttr, model_validator
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent
    from llama_index.core.instrumentation.span import active_span_id
    from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.query_engine import CustomQueryEngine
    from llama_index.core.response_synthesizers.base import BaseSynthesizer
    from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TextNode
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the LlamaIndex adapters need llama-index-core: pip install 'regrad[llamaindex]'") from err

from regrad_engine.errors import RequestError, check_k, check_texts
from regrad_engine.retrieval.base import Hit
from regrad_integrations._handoff import RunScopes
from regrad_integrations._registry import prompt_documents, registry_for

__all__ = ["ReGradLLM", "ReGradQueryEngine", "ReGradRetriever", "write_corpus"]

Mode = Literal["parametric", "hybrid"]
IdFn = Callable[[BaseNode], str]
ID_KEY = "regrad_id"  # metadata a ReGradRetriever puts on foreign nodes: their id in the bank


# ---------------------------------------------------------------- nodes <-> engine documents
def hit_to_node(hit: Hit) -> NodeWithScore:
    return NodeWithScore(node=TextNode(id_=hit.id, text=hit.text, metadata=dict(hit.metadata)), score=hit.score)


def bank_id(node: BaseNode | NodeWithScore, engine: Any, id_fn: IdFn | None = None) -> str:
    """The id under which the bank holds this node's gradient (see the module docstring)."""
    node = node.node if isinstance(node, NodeWithScore) else node
    if node.metadata.get(ID_KEY):
        return str(node.metadata[ID_KEY])
    if id_fn is not None and (chosen := id_fn(node)):
        return str(chosen)
    ref = node.ref_doc_id
    if ref and engine.bank is not None and ref in engine.bank:
        return ref
    return node.node_id


def node_hits(nodes: Iterable[NodeWithScore], engine: Any, id_fn: IdFn | None = None) -> list[Hit]:
    """The nodes as engine documents, one per bank id (the first node of an id wins)."""
    hits: dict[str, Hit] = {}
    for node in nodes:
        doc_id = bank_id(node, engine, id_fn)
        if doc_id not in hits:
            metadata = {k: v for k, v in node.node.metadata.items() if k != ID_KEY}
            hits[doc_id] = Hit(id=doc_id, text=node.node.get_content(), score=node.score or 0.0, metadata=metadata)
    return list(hits.values())


def _with_bank_id(node: NodeWithScore, doc_id: str) -> NodeWithScore:
    """A copy of a foreign node that carries its bank id (hidden from prompts and embeddings)."""
    inner = node.node
    if inner.metadata.get(ID_KEY) == doc_id:
        return node
    copy = inner.model_copy(update={
        "metadata": {**inner.metadata, ID_KEY: doc_id},
        "excluded_llm_metadata_keys": [*inner.excluded_llm_metadata_keys, ID_KEY],
        "excluded_embed_metadata_keys": [*inner.excluded_embed_metadata_keys, ID_KEY]})
    return NodeWithScore(node=copy, score=node.score)


def _warn_if_mostly_on_the_fly(owner: Any, engine: Any, hits: Sequence[Hit]) -> None:
    """Once per ``owner``: most of a query's gradients are not in the bank (each is computed now)."""
    if getattr(owner, "_warned_on_the_fly", True) or not hits or not engine.on_the_fly:
        return
    missing = [h.id for h in hits if engine.bank is None or h.id not in engine.bank]
    if 2 * len(missing) <= len(hits):
        return
    owner._warned_on_the_fly = True
    warnings.warn(
        f"{type(owner).__name__}: {len(missing)} of {len(hits)} documents of this query have no gradient in the "
        f"bank (e.g. id {missing[0]!r}), so each is computed on the fly, which is slow. Build the bank with "
        "`regrad build` from the same documents under the same ids (a LlamaIndex Document's id_ is its ref_doc_id; "
        "write_corpus(nodes, path) writes an index's nodes as a corpus), or map nodes to bank ids with id_fn=...",
        stacklevel=2)


def write_corpus(nodes: Iterable[BaseNode | NodeWithScore], path: str | os.PathLike, *,
                 id_fn: IdFn | None = None) -> int:
    """Write nodes as a ``regrad build`` corpus (JSONL), under the ids ReGrad looks them up by.

    A node is written under ``id_fn(node)``, else its ``ref_doc_id`` when it is its
    document's only node, else its ``node_id`` (stable only for a persisted index or a
    splitter with a deterministic ``id_func``). Keep nodes within the bank's chunk size
    (``regrad build --chunk-tokens``, 200 model tokens by default): a longer node is stored
    as chunks ``<id>#<i>`` and is no longer found by its id. Example::

        write_corpus(index.docstore.docs.values(), "nodes.jsonl")
        # regrad build --corpus nodes.jsonl --meta runs/meta/best --store runs/store

    Returns:
        The number of documents written.
    """
    nodes = [n.node if isinstance(n, NodeWithScore) else n for n in nodes]
    per_document = Counter(n.ref_doc_id for n in nodes if n.ref_doc_id)
    with open(path, "w", encoding="utf-8") as out:
        for node in nodes:
            doc_id = (id_fn(node) if id_fn is not None else None) or (
                node.ref_doc_id if node.ref_doc_id and per_document[node.ref_doc_id] == 1 else node.node_id)
            extra = {k: v for k, v in node.metadata.items()
                     if k not in ("id", "text", ID_KEY) and isinstance(v, (str, int, float, bool))}
            out.write(json.dumps({"id": str(doc_id), "text": node.get_content(), **extra}, ensure_ascii=False) + "\n")
    return len(nodes)


# ---------------------------------------------------------------- the run tree (spans)
class _RunTree(BaseSpanHandler):
    """Span handler on LlamaIndex's root dispatcher: records every span's parent and hands
    nodes to the spans above the step that produced them.

    * A retriever's ``RetrievalEndEvent`` (any retriever; the outermost one when retrievers
      nest, since its list is the one the pipeline gets) hands its nodes to its span and
      every span above it.
    * A synthesizer's ``synthesize(query, nodes)`` hands over the nodes it answers from
      (after postprocessors), nearer to the LLM than the retrieval.
    * An LLM call takes the nodes of the nearest span above it that holds some.
    * A streamed answer is generated when it is read, after the query's spans have ended:
      its response stream is wrapped so that the synthesizer's nodes are in the context
      (``_streamed_nodes``) while it is read.
    """

    _scopes: RunScopes = PrivateAttr(default_factory=RunScopes)
    _retrieving: dict = PrivateAttr(default_factory=dict)  # span inside a retriever -> under another one
    _outside: dict = PrivateAttr(default_factory=dict)  # our objects' spans with no foreign span above
    _mutex: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def new_span(self, id_: str, bound_args: Any, instance: Any = None, parent_span_id: str | None = None,
                 tags: Any = None, **kwargs: Any) -> None:
        self._scopes.started(id_, parent_span_id)
        with self._mutex:
            nested = parent_span_id in self._retrieving
            if nested or isinstance(instance, BaseRetriever):
                self._retrieving[id_] = nested
            if isinstance(instance, (ReGradRetriever, ReGradLLM)) and (
                    parent_span_id is None or parent_span_id in self._outside):
                self._outside[id_] = instance
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
            self._outside.pop(span, None)

    def retrieved(self, span: str | None, nodes: list[NodeWithScore]) -> None:
        with self._mutex:
            if span is None or self._retrieving.get(span):
                return  # the enclosing retriever hands over the list it returns
            owner = self._outside.get(span)
        self._scopes.add(span, nodes, key=_node_key)
        if isinstance(owner, ReGradRetriever):  # retrieved by hand: only text can tie these to a prompt
            registry_for(owner.engine).register(node_hits(nodes, owner.engine, owner.id_fn))

    def documents(self, span: str | None) -> tuple[list[NodeWithScore] | None, bool]:
        """(nodes handed to ``span`` or the nearest span above it that holds some, or None;
        whether ``span`` lies outside any pipeline: called by hand, or an unknown tree)."""
        nodes = self._scopes.find(span)
        with self._mutex:
            outside = span is None or span in self._outside
        return nodes, outside or (nodes is None and not self._scopes.known(span))


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


_tree: _RunTree | None = None
_tree_lock = threading.Lock()


def run_tree() -> _RunTree:
    """The span handler, added once to LlamaIndex's root dispatcher on first use."""
    global _tree
    if _tree is None:
        with _tree_lock:
            if _tree is None:
                tree = _RunTree()
                dispatcher = get_dispatcher()
                dispatcher.add_span_handler(tree)
                dispatcher.add_event_handler(_RetrievalHandOff())
                _tree = tree
    return _tree


# ---------------------------------------------------------------- retriever
class ReGradRetriever(BaseRetriever):
    """Nodes whose gradients a ReGrad LLM or query engine applies.

    Nodes come from the engine's own index (BM25, Elasticsearch, ...), or from
    ``base_retriever`` (any LlamaIndex retriever, e.g. ``index.as_retriever()``), returned
    as copies that carry their bank id in ``metadata["regrad_id"]`` (hidden from prompts
    and embeddings). Warns once when most of a query's gradients are not in the bank.

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
        _warn_if_mostly_on_the_fly(self, self.engine, hits)
        return [hit_to_node(hit) for hit in hits]

    def _mapped(self, nodes: list[NodeWithScore]) -> list[NodeWithScore]:
        nodes = nodes[:self.k] if self.k is not None else nodes
        mapped = [_with_bank_id(n, bank_id(n, self.engine, self.id_fn)) for n in nodes]
        _warn_if_mostly_on_the_fly(self, self.engine, node_hits(mapped, self.engine))
        return mapped


# ---------------------------------------------------------------- query engine
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
    mode: Mode = Field(default="parametric", description="'parametric' (gradients only) or 'hybrid' "
                                                         "(gradients + passages in the prompt).")
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
            _warn_if_mostly_on_the_fly(self, self.engine, hits)
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


# ---------------------------------------------------------------- LLM
_ROLES = {"developer": "system", "function": "tool", "chatbot": "assistant", "model": "assistant"}


class ReGradLLM(CustomLLM):
    """The engine as a LlamaIndex chat LLM that applies the gradients of its query's nodes.

    A call finds the nodes of its own query through the run's span tree: those the
    synthesizer answers from (after postprocessors), else those the query's outermost
    retriever returned. Every call of a query gets the gradients of all of them (refine and
    tree_summarize make several calls, each prompt with its own share of the text). In
    ``parametric`` mode their text is cut out of the prompt; in ``hybrid`` mode the prompt is
    read as rendered. Messages keep their roles (the engine applies the chat template).

    Called by hand, outside any pipeline, the LLM falls back to the documents a
    :class:`ReGradRetriever` returned by hand that the prompt contains verbatim. A
    parametric call with no documents warns (``strict=True``: raises ``RequestError``), since
    the answer then comes from the meta-learned model alone.

    Example::

        query_engine = index.as_query_engine(llm=ReGradLLM(engine=engine), similarity_top_k=3)
    """

    engine: Any = Field(description="The regrad_engine.ReGrad engine that does all the work.")
    mode: Mode = Field(default="parametric", description="'parametric' cuts the nodes' text from the prompt; "
                                                         "'hybrid' keeps it.")
    gamma: float | None = Field(default=None, description="Test-time step scale (default: the engine's).")
    max_new_tokens: int | None = Field(default=None, description="Answer length (default: the engine's).")
    context_window: int | None = Field(default=None, description="Prompt + answer budget in tokens (default: "
                                                                 "the engine's prompt limit plus the answer).")
    id_fn: IdFn | None = Field(default=None, exclude=True, description="node -> bank id (default: ref_doc_id "
                                                                      "if the bank holds it, else node_id).")
    strict: bool = Field(default=False, description="A parametric call without documents raises instead of "
                                                    "warning.")
    _warned_on_the_fly: bool = PrivateAttr(default=False)

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        run_tree()

    @classmethod
    def class_name(cls) -> str:
        return "regrad_llm"

    @property
    def metadata(self) -> LLMMetadata:
        answer = self.max_new_tokens or self.engine.max_new_tokens
        window = self.context_window
        if window is None:  # LlamaIndex's window holds prompt and answer; the engine's limit is the prompt's
            limit = self.engine.prompt_limit(answer)
            window = DEFAULT_CONTEXT_WINDOW if limit is None else limit + answer
        return LLMMetadata(model_name="regrad", is_chat_model=True, context_window=window, num_output=answer)

    # -- the one request path: documents from the run tree, prompt, engine
    def _request(self, message: str | list[dict[str, str]]) -> tuple[str | list[dict[str, str]], list[Hit]]:
        """What the model reads for this call, and the documents whose gradients it gets."""
        nodes, outside = run_tree().documents(active_span_id.get())
        if nodes is None:
            nodes = _streamed_nodes.get()  # a query's answer streamed after the query returned
        turns = [message] if isinstance(message, str) else [turn["content"] for turn in message]
        if nodes is not None:
            hits = node_hits(nodes, self.engine, self.id_fn)
            if self.mode == "parametric":
                passages = _passages(nodes)
                turns = [prompt_documents(self.engine, text, self.mode, passages)[0] for text in turns]
        elif outside:
            found = [prompt_documents(self.engine, text, self.mode) for text in turns]
            turns = [text for text, _, _ in found]
            hits = _first_of_each_id(h for _, turn_hits, _ in found for h in turn_hits)
        else:
            hits = []
        if not hits and self.mode == "parametric":
            problem = ("ReGradLLM (parametric) found no documents for this call, so the answer comes from the "
                       "meta-learned model alone: call it from the query engine or chat engine that retrieves "
                       "(or pass the nodes through a synthesizer), or use mode='hybrid'")
            if self.strict:
                raise RequestError(problem)
            warnings.warn(problem + "; strict=True makes this an error", stacklevel=3)
        _warn_if_mostly_on_the_fly(self, self.engine, hits)
        if isinstance(message, str):
            return turns[0], hits
        return [{**turn, "content": text} for turn, text in zip(message, turns)], hits

    def _generate(self, message: str | list[dict[str, str]]) -> tuple[str, dict[str, Any]]:
        message, hits = self._request(message)
        done = self.engine.complete([message], [hits], gamma=self.gamma, max_new_tokens=self.max_new_tokens)[0]
        return done.text, {**self._info(hits), "prompt_tokens": done.prompt_tokens,
                           "completion_tokens": done.completion_tokens, "finish_reason": done.finish_reason}

    def _stream(self, message: str | list[dict[str, str]]) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(text so far, delta, info) pieces; the documents are found now, in the caller's span."""
        message, hits = self._request(message)
        pieces = self.engine.stream_message(message, hits, gamma=self.gamma, max_new_tokens=self.max_new_tokens)
        info = self._info(hits)

        def gen() -> Iterator[tuple[str, str, dict[str, Any]]]:
            text = ""
            try:
                for delta in pieces:
                    delta = delta if text else delta.lstrip()
                    if delta:
                        text += delta
                        yield text, delta, info
            finally:
                pieces.close()

        return gen()

    def _info(self, hits: Sequence[Hit]) -> dict[str, Any]:
        return {"sources": [h.id for h in hits], "mode": self.mode}

    # -- LlamaIndex's hooks
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text, info = self._generate(prompt)
        return CompletionResponse(text=text, additional_kwargs=info)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        pieces = self._stream(prompt)
        return (CompletionResponse(text=text, delta=delta, additional_kwargs=info) for text, delta, info in pieces)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        text, info = self._generate(_conversation(messages))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), additional_kwargs=info)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        pieces = self._stream(_conversation(messages))
        return (ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta,
                             additional_kwargs=info) for text, delta, info in pieces)

    # Generation blocks: the async hooks run it in a worker thread (which keeps the span context).
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text, info = await asyncio.to_thread(self._generate, prompt)
        return CompletionResponse(text=text, additional_kwargs=info)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        pieces = await asyncio.to_thread(self._stream, prompt)
        return _in_thread(CompletionResponse(text=text, delta=delta, additional_kwargs=info)
                          for text, delta, info in pieces)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        text, info = await asyncio.to_thread(self._generate, _conversation(messages))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), additional_kwargs=info)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        pieces = await asyncio.to_thread(self._stream, _conversation(messages))
        return _in_thread(ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta,
                                       additional_kwargs=info) for text, delta, info in pieces)


def _conversation(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages as the engine's chat turns (roles kept; text blocks only)."""
    turns = []
    for message in messages:
        role = message.role.value if isinstance(message.role, MessageRole) else str(message.role)
        turns.append({"role": _ROLES.get(role, role), "content": message.content or ""})
    return turns


def _passages(nodes: Sequence[NodeWithScore]) -> list[Hit]:
    """The texts to cut for these nodes: as synthesizers render them (with metadata), and bare."""
    texts = {}
    for node in nodes:
        for mode in (MetadataMode.LLM, MetadataMode.NONE):
            texts.setdefault(node.node.get_content(metadata_mode=mode), node.node.node_id)
    return [Hit(id=node_id, text=text, score=0.0) for text, node_id in texts.items()]


def _first_of_each_id(hits: Iterable[Hit]) -> list[Hit]:
    unique: dict[str, Hit] = {}
    for hit in hits:
        unique.setdefault(hit.id, hit)
    return list(unique.values())


async def _in_thread(pieces: Iterator[Any]) -> AsyncIterator[Any]:
    """A blocking iterator as an async one: each step in a worker thread."""
    done = object()
    while (piece := await asyncio.to_thread(next, pieces, done)) is not done:
        yield piece
