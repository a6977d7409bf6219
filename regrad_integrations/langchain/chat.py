"""ChatReGrad: a LangChain chat model whose answers carry the gradients of its call's documents."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import (
    Runnable,
    RunnableLambda,
    RunnableMap,
    RunnablePassthrough,
)
from langchain_core.utils.function_calling import convert_to_json_schema
from pydantic import BaseModel, Field, model_validator

from regrad_engine.errors import RequestError
from regrad_engine.inference import ReGrad
from regrad_engine.retrieval.base import Hit
from regrad_integrations.langchain._base import (
    EngineBound,
    call_options,
    check_engine_or_store,
    check_no_cache,
    cut_at_stop,
    document_to_hit,
    explicit_documents,
    handed_documents,
    parent_run,
    prepare,
    stream_text,
    track_runs,
)

_ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool", "developer": "system"}
_CHAT_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "ai": "assistant", "system": "system",
               "tool": "tool"}


class ChatReGrad(EngineBound, BaseChatModel):
    """A chat model over a ReGrad engine: the message list rendered with the model's own
    chat template (roles kept), answered with the gradients of the call's documents.

    Documents, first found wins:

    1. ``documents=[...]`` given to the call (``chat.invoke(messages, documents=docs)``);
    2. the artifacts of the conversation's ``ToolMessage`` s (a retriever tool made with
       ``response_format="content_and_artifact"`` returns its Documents there);
    3. the documents a :class:`ReGradRetriever` returned in the same invocation (handed
       over through the run tree, however ``format_docs`` wrote them);
    4. outside any chain: registered documents whose text is in the messages.

    ``parametric`` mode cuts the documents' text out of every message, so the knowledge
    reaches the model only through their gradients; ``hybrid`` keeps it and puts any
    document the messages lack before the last user message. A parametric call without
    documents warns (``NoDocumentsWarning``) or, with ``strict=True``, raises.

    The answer is an ``AIMessage`` with ``usage_metadata`` and ``response_metadata``
    (``sources``, ``mode``, ``finish_reason``, ``model_name``). Decoding is greedy:
    ``temperature`` may only be 0 or unset. There is no tool calling (``bind_tools`` says
    why); ``with_structured_output`` asks for JSON and parses it.
    """

    engine: ReGrad | None = Field(None, exclude=True, description="The ReGrad engine; or give store.")
    store: str | None = Field(None, description="Store directory to open the engine from (what serialisation keeps).")
    mode: Literal["parametric", "hybrid"] = Field(
        "parametric", description="parametric: documents' text cut from the messages, knowledge from gradients "
                                  "only; hybrid: gradients plus the passages in the prompt.")
    gamma: float = Field(1.0, description="Test-time step scale of the gradient update.")
    max_tokens: int | None = Field(None, ge=1, description="Longest answer in tokens (default: the engine's).")
    temperature: float | None = Field(None, description="Only 0 or None: decoding is greedy.")
    stop: list[str] | None = Field(None, description="Stop sequences for every call.")
    strict: bool = Field(False, description="Raise instead of warning when a parametric call gets no documents.")
    cache: Any = Field(False, description="Always False: answers depend on each call's documents, which LangChain's "
                                          "cache key does not hold.")
    timeout: float | None = Field(None, description="Accepted for compatibility: the model runs in this process.")
    max_retries: int | None = Field(None, description="Accepted for compatibility: nothing is retried.")

    @model_validator(mode="after")
    def _check(self) -> ChatReGrad:
        self.store = check_engine_or_store(self.engine, self.store)
        check_no_cache(self.cache)
        if self.temperature not in (None, 0, 0.0):
            raise ValueError(f"ChatReGrad decodes greedily: set temperature=0 or leave it out (got {self.temperature})")
        track_runs()
        return self

    @property
    def model_name(self) -> str:
        engine = self.engine
        return engine.meta.base_model if engine is not None else f"regrad:{self.store}"

    @property
    def _llm_type(self) -> str:
        return "regrad-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "store": self.store, "mode": self.mode, "gamma": self.gamma,
                "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params.update(ls_provider="regrad", ls_model_name=kwargs.get("model") or self.model_name,
                      ls_model_type="chat", ls_temperature=0.0)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # ------------------------------------------------------------ tokens
    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Tokens of the prompt the model reads for these messages (chat template included)."""
        if tools:
            raise NotImplementedError(_NO_TOOLS)
        turns, _ = to_turns(messages)
        return self.regrad_engine.count_tokens(turns)

    # ------------------------------------------------------------ generation
    def _request(self, messages: list[BaseMessage], run_manager: Any, kwargs: dict[str, Any]
                 ) -> tuple[ReGrad, str, float, dict[str, Any], list[dict[str, str]], list[Hit]]:
        engine = self.regrad_engine
        mode, gamma, options = call_options(kwargs, self.mode, self.gamma, self.max_tokens)
        if options.pop("temperature", 0) not in (None, 0, 0.0):
            raise RequestError("ChatReGrad decodes greedily: temperature must be 0 or left out")
        for name in ("timeout", "max_retries", "stream_options"):
            options.pop(name, None)
        turns, artifacts = to_turns(messages)
        handed = explicit_documents(options.pop("documents", None))
        if handed is None and artifacts:
            handed = artifacts
        if handed is None:
            handed = handed_documents(parent_run(run_manager))
        turns, hits = prepare(engine, turns, mode, handed, strict=self.strict)
        return engine, mode, gamma, options, turns, hits

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        engine, mode, gamma, options, turns, hits = self._request(messages, run_manager, kwargs)
        completion = engine.complete([turns], [hits], gamma=gamma, **options)[0]
        stop = stop or self.stop
        message = AIMessage(content=cut_at_stop(completion.text, stop),
                            usage_metadata=_usage(completion.prompt_tokens, completion.completion_tokens),
                            response_metadata=_metadata(engine, hits, mode, completion.finish_reason))
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"model_name": engine.meta.base_model})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        engine, mode, gamma, options, turns, hits = self._request(messages, run_manager, kwargs)
        pieces = engine.stream_message(turns, hits, gamma=gamma, **options)
        try:
            for piece in stream_text(pieces, stop or self.stop):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager is not None:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        finally:
            pieces.close()  # generation stops at its next step (stop sequence met, stream closed)
        done = pieces.completion  # (also when a stop sequence closed the stream early)
        yield ChatGenerationChunk(message=AIMessageChunk(
            content="", usage_metadata=_usage(done.prompt_tokens, done.completion_tokens), chunk_position="last",
            response_metadata=_metadata(engine, hits, mode, done.finish_reason)))

    # ------------------------------------------------------------ tools and structured output
    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable:
        """Not supported: raises with the reason and what to do instead."""
        raise NotImplementedError(_NO_TOOLS)

    def with_structured_output(self, schema: dict | type, *, include_raw: bool = False,
                               method: Literal["json_schema", "json_mode", "function_calling"] = "json_schema",
                               strict: bool | None = None, **kwargs: Any) -> Runnable:
        """Structured output by JSON: the schema's format instructions are added to the last
        user message and the answer is parsed (a pydantic class gives an instance, a JSON
        schema or TypedDict a dict). Every ``method`` works this way: there is no
        function calling and no constrained decoding, so a small model may produce JSON
        that does not parse (``include_raw=True`` returns the error instead of raising)."""
        if kwargs:
            raise ValueError(f"unexpected arguments: {sorted(kwargs)}")
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            parser: Runnable = PydanticOutputParser(pydantic_object=schema)
            instructions = parser.get_format_instructions()
        else:
            json_schema = convert_to_json_schema(schema)
            parser = JsonOutputParser()
            instructions = ("Answer with a JSON object that conforms to this JSON schema, and nothing else:\n"
                            f"{json_schema}")
        llm = RunnableLambda(_add_instructions(self, instructions)) | self
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([fallback], exception_key="parsing_error")


_NO_TOOLS = ("ChatReGrad cannot call tools: ReGrad adapts a small local model with document gradients and has "
             "no tool-calling support. Give it documents instead: a ReGradRetriever in the chain, documents=[...] "
             "in the call, or a retriever tool's output as a ToolMessage artifact "
             "(create_retriever_tool(..., response_format='content_and_artifact')) run by another agent model")


def to_turns(messages: Sequence[BaseMessage]) -> tuple[list[dict[str, str]], list[Hit]]:
    """Role/content turns for the chat template, and the Documents found as tool artifacts."""
    turns: list[dict[str, str]] = []
    artifacts: dict[str, Hit] = {}
    for message in messages:
        role = _ROLES.get(message.type) or _CHAT_ROLES.get(str(getattr(message, "role", "")).lower())
        if role is None:
            raise RequestError(f"ChatReGrad cannot read a {message.type!r} message: use system, human, ai or tool "
                               "messages")
        if isinstance(message.content, list) and any(
                not isinstance(block, str) and block.get("type") not in ("text", None) for block in message.content):
            raise RequestError("ChatReGrad reads text only: this message has non-text content (image, audio, file)")
        turns.append({"role": role, "content": message.text})
        if isinstance(message, ToolMessage) and isinstance(message.artifact, list):
            for doc in message.artifact:
                if isinstance(doc, Document):
                    hit = document_to_hit(doc)
                    artifacts.setdefault(hit.id, hit)
    return turns, list(artifacts.values())


def _usage(prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"input_tokens": prompt_tokens, "output_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens}


def _metadata(engine: ReGrad, hits: Sequence[Hit], mode: str, finish_reason: str) -> dict[str, Any]:
    return {"model_name": engine.meta.base_model, "finish_reason": finish_reason, "mode": mode,
            "sources": [hit.id for hit in hits]}


def _add_instructions(chat: ChatReGrad, instructions: str) -> Callable[[LanguageModelInput], list[BaseMessage]]:
    def add(value: LanguageModelInput) -> list[BaseMessage]:
        messages = list(chat._convert_input(value).to_messages())
        for i in range(len(messages) - 1, -1, -1):
            if messages[i].type == "human":
                messages[i] = HumanMessage(content=f"{messages[i].text}\n\n{instructions}")
                return messages
        return [*messages, HumanMessage(content=instructions)]

    return add
