"""ReGradLLM: the engine as a LlamaIndex chat LLM, with the gradients of its own query's nodes."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, Literal

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
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.schema import MetadataMode, NodeWithScore

from regrad_engine.errors import RequestError
from regrad_engine.retrieval.base import Hit
from regrad_integrations._registry import prompt_documents
from regrad_integrations.llama_index._nodes import IdFn, NoDocumentsWarning, node_hits, warn_if_mostly_on_the_fly
from regrad_integrations.llama_index._spans import run_tree


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
    parametric call with no documents warns (``NoDocumentsWarning``; ``strict=True``: raises
    ``RequestError``), since the answer then comes from the meta-learned model alone.

    Example::

        query_engine = index.as_query_engine(llm=ReGradLLM(engine=engine), similarity_top_k=3)
    """

    engine: Any = Field(description="The regrad_engine.ReGrad engine that does all the work.")
    mode: Literal["parametric", "hybrid"] = Field(
        default="parametric", description="'parametric' cuts the nodes' text from the prompt; 'hybrid' keeps it.")
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
        nodes, by_hand = run_tree().documents()
        turns = [message] if isinstance(message, str) else [turn["content"] for turn in message]
        if nodes is not None:
            hits = node_hits(nodes, self.engine, self.id_fn)
            if self.mode == "parametric":
                passages = _passages(nodes)
                turns = [prompt_documents(self.engine, text, self.mode, passages)[0] for text in turns]
        elif by_hand:
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
            warnings.warn(problem + "; strict=True makes this an error", NoDocumentsWarning, stacklevel=3)
        warn_if_mostly_on_the_fly(self, self.engine, hits)
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
