"""LlamaIndex adapters for a ReGrad engine: a retriever, a query engine and an LLM.

* :class:`ReGradRetriever` returns the engine retriever's documents as ``NodeWithScore``.
* :class:`ReGradQueryEngine` answers a query from the nodes of any LlamaIndex retriever:
  their gradients (looked up in the bank by node id, or computed on the fly) adapt the
  model for this request only; in ``hybrid`` mode their text is in the prompt as well.
* :class:`ReGradLLM` is for an existing LlamaIndex pipeline (e.g. ``RetrieverQueryEngine``):
  it finds the documents a :class:`ReGradRetriever` returned in the rendered prompt,
  applies their gradients and, in ``parametric`` mode, removes their text from the prompt.

Every computation happens in the engine (:class:`regrad_engine.ReGrad`); these classes
only translate between LlamaIndex objects and the engine's calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.llms.types import (
        CompletionResponse,
        CompletionResponseGen,
        LLMMetadata,
    )
    from llama_index.core.base.response.schema import Response, StreamingResponse
    from llama_index.core.bridge.pydantic import Field, model_validator
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
    from llama_index.core.llms.callbacks import llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.query_engine import CustomQueryEngine
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the LlamaIndex adapters need llama-index-core: pip install 'regrad[llamaindex]'") from err

from regrad_engine.errors import check_k, check_texts
from regrad_engine.retrieval.base import Hit
from regrad_integrations._registry import prompt_documents, registry_for

__all__ = ["ReGradLLM", "ReGradQueryEngine", "ReGradRetriever"]

Mode = Literal["parametric", "hybrid"]


def hit_to_node(hit: Hit) -> NodeWithScore:
    return NodeWithScore(node=TextNode(id_=hit.id, text=hit.text, metadata=dict(hit.metadata)), score=hit.score)


def node_to_hit(node: NodeWithScore) -> Hit:
    """Any retriever's node as an engine document: its gradient is found by ``node_id``."""
    return Hit(id=node.node_id, text=node.get_content(), score=node.score or 0.0, metadata=dict(node.metadata))


class ReGradRetriever(BaseRetriever):
    """The engine's retriever (BM25, Elasticsearch, ...) as a LlamaIndex retriever.

    Returned documents are registered with the engine's document registry, so that a
    :class:`ReGradLLM` can recognise them in a prompt.

    Args:
        engine: A :class:`regrad_engine.ReGrad` with a retriever.
        k: Documents per query (default: the engine's ``k``).
        callback_manager: LlamaIndex callback manager.
    """

    def __init__(self, engine: Any, k: int | None = None, callback_manager: CallbackManager | None = None) -> None:
        super().__init__(callback_manager=callback_manager)
        self.engine = engine
        self.k = check_k(engine.k if k is None else k)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        check_texts([query_bundle.query_str])  # before a foreign retriever or embedder sees it
        hits = self.engine.retrieve([query_bundle.query_str], self.k)[0]
        registry_for(self.engine).register(hits)
        return [hit_to_node(hit) for hit in hits]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


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

    @model_validator(mode="after")
    def _default_retriever(self) -> ReGradQueryEngine:
        if self.retriever is None:
            self.retriever = ReGradRetriever(self.engine, k=self.k)
        return self

    def _generate_kwargs(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens is not None else {}

    def _response(self, text: str, nodes: list[NodeWithScore]) -> Response:
        return Response(response=text, source_nodes=nodes,
                        metadata={"mode": self.mode, "sources": [n.node_id for n in nodes]})

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        check_texts([query_str])
        nodes = self.retriever.retrieve(query_str)
        hits = [node_to_hit(node) for node in nodes]
        if self.streaming:
            pieces = self.engine.stream(query_str, mode=self.mode, gamma=self.gamma, documents=hits,
                                        **self._generate_kwargs())
            return StreamingResponse(response_gen=pieces, source_nodes=nodes,
                                     metadata={"mode": self.mode, "sources": [h.id for h in hits]})
        answer = self.engine.answer_batch([query_str], mode=self.mode, gamma=self.gamma, documents=[hits],
                                          **self._generate_kwargs())[0]
        return self._response(answer.text, nodes)

    async def acustom_query(self, query_str: str) -> Response | StreamingResponse:
        return await asyncio.to_thread(self.custom_query, query_str)

    def query_batch(self, queries: Sequence[str]) -> list[Response]:
        """Answer many queries with one batched generation (same answers as one at a time)."""
        for query_str in queries:
            check_texts([query_str])
        node_lists = [self.retriever.retrieve(q) for q in queries]
        documents = [[node_to_hit(node) for node in nodes] for nodes in node_lists]
        answers = self.engine.answer_batch(list(queries), mode=self.mode, gamma=self.gamma, documents=documents,
                                           **self._generate_kwargs())
        return [self._response(a.text, nodes) for a, nodes in zip(answers, node_lists)]


class ReGradLLM(CustomLLM):
    """The engine as a LlamaIndex LLM, for pipelines that render their own prompt.

    The documents of a :class:`ReGradRetriever` (same engine) that appear in the prompt
    have their gradients applied; in ``parametric`` mode their text is removed from the
    prompt first. A prompt without such documents is answered by the meta-learned model.

    Example::

        query_engine = RetrieverQueryEngine.from_args(
            retriever=ReGradRetriever(engine), llm=ReGradLLM(engine=engine, mode="hybrid"))
    """

    engine: Any = Field(description="The regrad_engine.ReGrad engine that does all the work.")
    mode: Mode = Field(default="parametric", description="'parametric' removes the found documents' text "
                                                         "from the prompt; 'hybrid' keeps it.")
    gamma: float | None = Field(default=None, description="Test-time step scale (default: the engine's).")
    max_new_tokens: int | None = Field(default=None, description="Answer length (default: the engine's).")
    context_window: int = Field(default=DEFAULT_CONTEXT_WINDOW, description="Prompt budget in tokens.")

    @classmethod
    def class_name(cls) -> str:
        return "regrad_llm"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="regrad", is_chat_model=False, context_window=self.context_window,
                           num_output=self.max_new_tokens or self.engine.max_new_tokens)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        message, hits, _ = prompt_documents(self.engine, prompt, self.mode)
        text = self.engine.complete_batch([message], [hits], gamma=self.gamma,
                                          max_new_tokens=self.max_new_tokens)[0]
        return CompletionResponse(text=text)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        # Generation is blocking: run it off the event loop (CustomLLM's default runs it on the loop).
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        message, hits, _ = prompt_documents(self.engine, prompt, self.mode)
        check_texts([message], "prompt")

        def gen() -> CompletionResponseGen:
            text = ""
            for delta in self.engine.stream_message(message, hits, gamma=self.gamma,
                                                    max_new_tokens=self.max_new_tokens):
                text += delta
                yield CompletionResponse(text=text, delta=delta)

        return gen()
