"""The OpenAI wire format of ``regrad serve``: request bodies, the features refused, and the
shapes of answers and streamed chunks. No web framework here: ``server.py`` wires it to HTTP.

Request bodies are pydantic models that refuse unknown fields (a misspelt ``documents`` must
not be ignored silently); ReGrad's own fields (``mode``, ``k``, ``gamma``, ``documents``,
``use_gradients``) are checked with the engine's ``check_*`` so every message reads the same.
A bad field is a :class:`FieldError` (a RequestError naming the field): HTTP 400 with
OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from regrad_engine.errors import RegradError, RequestError, check_conversations
from regrad_engine.inference import Completion, TextStream
from regrad_engine.prompts import Conversation

logger = logging.getLogger(__name__)

MAX_PROMPTS = 64  # per /v1/completions request


class FieldError(RequestError):
    """A bad request field; ``param`` names it (the ``param`` of the OpenAI error body)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# ------------------------------------------------------------------ request bodies
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name", "refusal": not read

    role: str = Field(description="system, developer (read as system), user, assistant or tool")
    content: str | list[dict[str, Any]] | None = Field(None, description="text, or text parts")


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="send the token counts in a last chunk")


class OpenAIRequest(BaseModel):
    """Fields both endpoints share; unknown fields are refused (a misspelt ``documents`` must
    not be ignored silently)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="any name: one engine serves every request")
    stream: bool = Field(False, description="answer with server-sent events")
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, description="answer length (default: the engine's max_new_tokens)")
    stop: str | list[str] | None = Field(None, description="the answer is cut before the first of these")
    n: int | None = Field(None, description="1 only: decoding is greedy")
    logit_bias: dict[str, float] | None = Field(None, description="refused unless empty")
    temperature: float | None = Field(None, description="ignored: decoding is greedy")
    top_p: float | None = Field(None, description="ignored: decoding is greedy")
    presence_penalty: float | None = Field(None, description="ignored")
    frequency_penalty: float | None = Field(None, description="ignored")
    seed: int | None = Field(None, description="ignored: decoding is deterministic")
    user: str | None = Field(None, description="ignored")
    mode: Any = Field(None, description='"parametric" or "hybrid" (default: the engine\'s)')
    k: Any = Field(None, description="documents to retrieve (default: the engine's k)")
    gamma: Any = Field(None, description="test-time step scale (default: the engine's)")
    documents: Any = Field(None, description='store ids or {"text": ..., "id": ...} objects, instead of retrieval')
    use_gradients: Any = Field(True, description="false: the meta-learned LoRA without document updates")


class ChatRequest(OpenAIRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, description="answer length (wins over max_tokens)")
    logprobs: bool | None = Field(None, description="refused if true")
    top_logprobs: int | None = Field(None, description="refused")
    tools: list[Any] | None = Field(None, description="refused: no tool calling")
    tool_choice: Any = Field(None, description='refused unless "none"')
    functions: list[Any] | None = Field(None, description="refused: no function calling")
    function_call: Any = Field(None, description="refused")
    parallel_tool_calls: bool | None = Field(None, description="ignored: no tool calling")
    response_format: dict[str, Any] | None = Field(None, description='{"type": "text"} only')
    metadata: dict[str, Any] | None = Field(None, description="ignored")
    store: bool | None = Field(None, description="ignored: nothing is stored")


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] = Field(description=f"one prompt or up to {MAX_PROMPTS}, each one user turn")
    logprobs: int | None = Field(None, description="refused")
    echo: bool | None = Field(None, description="refused if true")
    suffix: str | None = Field(None, description="refused")
    best_of: int | None = Field(None, description="1 only")


def refuse_unsupported(body: OpenAIRequest) -> None:
    """The OpenAI features this server does not have, each with what to send instead."""
    tool_choice = getattr(body, "tool_choice", None)
    response_format = getattr(body, "response_format", None) or {}
    refused = [
        (body.n not in (None, 1), "n", f"n={body.n} is not supported: decoding is greedy, so every choice "
                                       "would be the same; send n=1 or leave it out"),
        (getattr(body, "tools", None) or getattr(body, "functions", None) or getattr(body, "function_call", None)
         or tool_choice not in (None, "none"), "tools", "tools and function calling are not supported by this server"),
        (body.logprobs not in (None, False, 0) or getattr(body, "top_logprobs", None), "logprobs",
         "logprobs are not supported by this server"),
        (response_format.get("type", "text") != "text", "response_format",
         f"response_format {response_format.get('type')!r} is not supported (greedy decoding without "
         "constraints): ask for JSON in the prompt"),
        (body.logit_bias, "logit_bias", "logit_bias is not supported by this server"),
        (getattr(body, "echo", None), "echo", "echo is not supported by this server"),
        (getattr(body, "suffix", None), "suffix", "suffix (insertion) is not supported by this server"),
        (getattr(body, "best_of", None) not in (None, 1), "best_of", "best_of must be 1: decoding is greedy"),
    ]
    for bad, param, message in refused:
        if bad:
            raise FieldError(message, param)


# ------------------------------------------------------------------ request fields
def checked(param: str, check: Callable[..., Any], value: Any, *args: Any) -> Any:
    try:
        return check(value, *args)
    except RequestError as err:
        raise FieldError(str(err), param) from None


def _text(content: str | list[dict[str, Any]] | None, param: str) -> str:
    """A message's content as text (text parts joined; other parts refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise FieldError(f"only text content is supported, got a {part.get('type')!r} part", param)
        texts.append(part["text"])
    return "\n".join(texts)


def conversation_of(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI chat messages as the engine's conversation (checked)."""
    if not messages:
        raise FieldError("messages must be a non-empty list of chat turns", "messages")
    turns = [{"role": "system" if m.role == "developer" else m.role,
              "content": _text(m.content, f"messages.{i}.content")} for i, m in enumerate(messages)]
    return checked("messages", check_conversations, [turns], "conversation")[0]


def query_of(conversation: Conversation) -> str:
    """The retrieval query: the last non-blank user turn."""
    if isinstance(conversation, str):
        return conversation
    users = [t["content"] for t in conversation if t["role"] == "user" and t["content"].strip()]
    if not users:
        raise FieldError("no user message to retrieve documents for: add one, or pass documents", "messages")
    return users[-1]



# ------------------------------------------------------------------ responses
def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop sequence, and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


class StreamCutter:
    """Streamed pieces as the non-streamed text would read: leading and trailing whitespace
    dropped, cut before the first stop sequence (text that may begin one is held back)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.hold = stops, max((len(s) for s in stops), default=1) - 1
        self.buffer, self.started, self.stopped = "", False, False

    def feed(self, piece: str) -> str:
        self.buffer += piece
        if not self.started:
            self.buffer = self.buffer.lstrip()
            self.started = bool(self.buffer)
        text, self.stopped = cut_at_stop(self.buffer, self.stops)
        if self.stopped:
            self.buffer = ""
            return text
        ready = min(len(self.buffer) - self.hold, len(self.buffer.rstrip()))
        out, self.buffer = self.buffer[:max(ready, 0)], self.buffer[max(ready, 0):]
        return out

    def finish(self) -> str:
        out, self.buffer = self.buffer.rstrip(), ""
        return out


def stop_sequences(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise FieldError("a stop sequence must be a non-empty string", "stop")
    return stops


def _usage(completions: list[Completion]) -> dict[str, int]:
    prompt, answer = sum(c.prompt_tokens for c in completions), sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_of(err: Exception) -> tuple[int, dict]:
    """HTTP status and OpenAI error body of an exception (a user's mistake: 400)."""
    if isinstance(err, (RequestError, KeyError)) and isinstance(err, RegradError):
        return 400, error_body(str(err), param=getattr(err, "param", None))
    if isinstance(err, RegradError):
        return 500, error_body(str(err), "server_error")
    logger.error("request failed", exc_info=err)
    return 500, error_body(f"internal error ({type(err).__name__}): see the server log", "server_error")


class Reply:
    """The OpenAI shape of one endpoint's answers: ``chat`` (chat.completion) or text completion."""

    def __init__(self, chat: bool, model_id: str) -> None:
        self.chat, self.model_id = chat, model_id
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    def choice(self, index: int, text: str | None, finish: str | None, *, delta: bool = False,
               first: bool = False) -> dict:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not delta:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        content = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}

    def whole(self, completions: list[Completion], sources: list[list[dict]], stops: list[str]) -> dict:
        """The whole answer; with several prompts each choice also carries its own sources."""
        choices = []
        for i, completion in enumerate(completions):
            text, stopped = cut_at_stop(completion.text, stops)
            choices.append(self.choice(i, text, "stop" if stopped else completion.finish_reason))
            if len(sources) > 1:
                choices[-1]["sources"] = sources[i]
        flat = [s for group in sources for s in group]
        return {**self.envelope(), "choices": choices, "usage": _usage(completions), "sources": flat}

    def events(self, stream: TextStream, sources: list[dict], stops: list[str], usage: bool) -> Iterator[str]:
        """Server-sent events: role (and sources) first, text pieces, finish reason, usage, [DONE].
        Closing the stream when the events end (at a stop sequence, or when the client goes
        away) stops its generation at the next token."""
        cutter = StreamCutter(stops)
        try:
            yield _event({**self.envelope(True), "choices": [self.choice(0, "", None, delta=True, first=True)],
                          "sources": sources})
            for piece in stream:
                text = cutter.feed(piece)
                if text:
                    yield _event({**self.envelope(True), "choices": [self.choice(0, text, None, delta=True)]})
                if cutter.stopped:
                    break
            tail = "" if cutter.stopped else cutter.finish()
            if tail:
                yield _event({**self.envelope(True), "choices": [self.choice(0, tail, None, delta=True)]})
            if cutter.stopped and usage:
                for _ in stream:  # the token counts are those of the whole generation
                    pass
            finish = "stop" if cutter.stopped else stream.completion.finish_reason
            yield _event({**self.envelope(True), "choices": [self.choice(0, None, finish, delta=True)]})
            if usage:
                yield _event({**self.envelope(True), "choices": [], "usage": _usage([stream.completion])})
        except Exception as err:  # noqa: BLE001 - the status line is sent already: report in the stream
            yield _event(error_of(err)[1])
        finally:
            stream.close()
        yield _event("[DONE]")
