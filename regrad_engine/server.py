"""``regrad serve``: an OpenAI-compatible HTTP API over one engine; every request gets the
gradients of its own documents.

Endpoints:
    POST /v1/chat/completions, /v1/completions   ``"stream": true`` answers with server-sent events
    GET  /v1/models, /v1/models/{id}             one model, the server's ``model_id``
    GET  /health                                 the process answers (liveness)
    GET  /ready                                  the engine is loaded and the batch worker runs

ReGrad's fields beside OpenAI's (the ``openai`` client sends them with ``extra_body={...}``):
    mode           "parametric" (gradients only) or "hybrid" (gradients and passages in the prompt)
    k              documents to retrieve; the query is the last user message (or the prompt)
    gamma          test-time step scale
    documents      instead of retrieval: store ids ("doc-17"), or {"text": ..., "id": ...} for a
                   document outside the store (its gradient is computed now; id: a hash of the text)
    use_gradients  false: the meta-learned LoRA without document updates
Every response carries ``sources`` ([{"id", "score"}]); a stream sends them in its first chunk.

Decoding is greedy: temperature, top_p, seed and the penalties are accepted and ignored. Refused
with 400: n > 1, tools and function calls, logprobs, JSON response formats, logit_bias, echo,
suffix. ``model`` may name anything (one engine serves every request) and responses name the
server's model id. The prompt of /v1/completions is read as one user turn in the chat template.
Non-streamed requests are batched dynamically (``batching.py``); each stream runs on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

try:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the server needs fastapi and uvicorn: pip install 'regrad[serve]'") from err
from pydantic import BaseModel, ConfigDict, Field

from regrad_engine.bank import text_hash
from regrad_engine.batching import DynamicBatcher, Job
from regrad_engine.errors import (
    RegradError,
    RequestError,
    check_conversations,
    check_gamma,
    check_k,
    check_mode,
)
from regrad_engine.inference import Completion, ReGrad, TextStream
from regrad_engine.prompts import Conversation, with_passages
from regrad_engine.retrieval.base import Hit

logger = logging.getLogger(__name__)

MAX_DOCUMENTS = 32  # per request: each document outside the bank costs a backward pass
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


class _Request(BaseModel):
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


class ChatRequest(_Request):
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


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(description=f"one prompt or up to {MAX_PROMPTS}, each one user turn")
    logprobs: int | None = Field(None, description="refused")
    echo: bool | None = Field(None, description="refused if true")
    suffix: str | None = Field(None, description="refused")
    best_of: int | None = Field(None, description="1 only")


def _refuse_unsupported(body: _Request) -> None:
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


# ------------------------------------------------------------------ requests -> jobs
def _checked(param: str, check: Callable[..., Any], value: Any, *args: Any) -> Any:
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
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, f"messages.{i}.content")}
             for i, m in enumerate(messages)]
    return _checked("messages", check_conversations, [turns], "conversation")[0]


def _query(conversation: Conversation) -> str:
    """The retrieval query: the last non-blank user turn."""
    if isinstance(conversation, str):
        return conversation
    users = [t["content"] for t in conversation if t["role"] == "user" and t["content"].strip()]
    if not users:
        raise FieldError("no user message to retrieve documents for: add one, or pass documents", "messages")
    return users[-1]


class _Requests:
    """Turns checked request bodies into :class:`Job` s (blocking: run it in a thread)."""

    def __init__(self, engine: ReGrad) -> None:
        self.engine = engine

    def job(self, body: _Request, conversation: Conversation, max_tokens: int | None) -> tuple[Job, list[dict]]:
        engine = self.engine
        mode = _checked("mode", check_mode, engine.mode if body.mode is None else body.mode)
        gamma = _checked("gamma", check_gamma, engine.gamma if body.gamma is None else body.gamma)
        max_new = _checked("max_tokens", check_k, engine.max_new_tokens if max_tokens is None else max_tokens,
                           "max_tokens")
        k = _checked("k", check_k, engine.k if body.k is None else body.k)
        if k > MAX_DOCUMENTS:
            raise FieldError(f"k must be at most {MAX_DOCUMENTS}, got {k}", "k")
        if not isinstance(body.use_gradients, bool):
            raise FieldError(f"use_gradients must be true or false, got {body.use_gradients!r}", "use_gradients")
        if body.documents is not None:
            named = self.documents(body.documents)
        elif body.use_gradients or mode == "hybrid":
            named = [(hit, hit.id) for hit in engine.retrieve([_query(conversation)], k)[0]]
        else:
            named = []  # parametric without gradients: documents would change nothing
        if not body.use_gradients and mode == "parametric":
            named = []
        hits = [hit for hit, _ in named]
        prompt = with_passages(conversation, [h.text for h in hits]) if mode == "hybrid" else conversation
        engine.check_prompts([prompt], max_new)
        sources = [{"id": name, "score": hit.score} for hit, name in named]
        return Job(prompt, hits if body.use_gradients else [], gamma, max_new), sources

    def documents(self, specs: Any) -> list[tuple[Hit, str]]:
        """The request's documents, each with the id the response names it by: store ids, or
        ``{"text", "id"?}`` objects."""
        if not isinstance(specs, list):
            raise FieldError('documents must be a list of store ids or {"text": ...} objects', "documents")
        if len(specs) > MAX_DOCUMENTS:
            raise FieldError(f"at most {MAX_DOCUMENTS} documents per request, got {len(specs)}", "documents")
        named = []
        for i, spec in enumerate(specs):
            param = f"documents.{i}"
            if isinstance(spec, dict) and set(spec) <= {"id", "text"} and spec:
                doc_id, text = spec.get("id"), spec.get("text")
                if doc_id is not None and (not isinstance(doc_id, str) or not doc_id):
                    raise FieldError(f"a document id must be a non-empty string, got {doc_id!r}", param)
                hit = self.stored(doc_id, param) if text is None else self.outside(text, param)
                named.append((hit, doc_id or hit.id))
            elif isinstance(spec, str) and spec:
                named.append((self.stored(spec, param), spec))
            else:
                raise FieldError(f'every document is a store id or an object {{"text": ..., "id": ...}}, got '
                                 f"{spec!r:.80}", param)
        return named

    def stored(self, doc_id: str, param: str) -> Hit:
        get = getattr(self.engine.retriever, "get", None)
        if get is None:
            raise FieldError('this server cannot look documents up by id: pass {"text": ...} objects', param)
        try:
            return get(doc_id)
        except KeyError:
            raise FieldError(f'unknown document id {doc_id!r}: it is not in the store; pass {{"text": ...}} for '
                             "a document outside it", param) from None

    def outside(self, text: Any, param: str) -> Hit:
        """A document outside the store. Its gradient is keyed by the hash of its text, so a
        caller's id can never pick up a stored gradient of another text."""
        if not isinstance(text, str) or not text.strip():
            raise FieldError("a document's text must be a non-blank string", param)
        if len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]) < 2:
            raise FieldError(f"the document {text!r:.40} is too short for a gradient (2 tokens or more)", param)
        return Hit(f"text-{text_hash(text)}", text, 0.0)


# ------------------------------------------------------------------ responses
def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop sequence, and whether one was found."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


class _StreamCutter:
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
        text, self.stopped = _cut(self.buffer, self.stops)
        if self.stopped:
            self.buffer = ""
            return text
        ready = min(len(self.buffer) - self.hold, len(self.buffer.rstrip()))
        out, self.buffer = self.buffer[:max(ready, 0)], self.buffer[max(ready, 0):]
        return out

    def finish(self) -> str:
        out, self.buffer = self.buffer.rstrip(), ""
        return out


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise FieldError("a stop sequence must be a non-empty string", "stop")
    return stops


def _usage(completions: list[Completion]) -> dict[str, int]:
    prompt, answer = sum(c.prompt_tokens for c in completions), sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_of(err: Exception) -> tuple[int, dict]:
    """HTTP status and OpenAI error body of an exception (a user's mistake: 400)."""
    if isinstance(err, (RequestError, KeyError)) and isinstance(err, RegradError):
        return 400, _error_body(str(err), param=getattr(err, "param", None))
    if isinstance(err, RegradError):
        return 500, _error_body(str(err), "server_error")
    logger.error("request failed", exc_info=err)
    return 500, _error_body(f"internal error ({type(err).__name__}): see the server log", "server_error")


class _Reply:
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
            text, stopped = _cut(completion.text, stops)
            choices.append(self.choice(i, text, "stop" if stopped else completion.finish_reason))
            if len(sources) > 1:
                choices[-1]["sources"] = sources[i]
        flat = [s for group in sources for s in group]
        return {**self.envelope(), "choices": choices, "usage": _usage(completions), "sources": flat}

    def events(self, stream: TextStream, sources: list[dict], stops: list[str], usage: bool) -> Iterator[str]:
        """Server-sent events: role (and sources) first, text pieces, finish reason, usage, [DONE]."""
        cutter = _StreamCutter(stops)
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
                for _ in stream:  # the rest is generated anyway: read it for exact token counts
                    pass
            finish = "stop" if cutter.stopped else stream.completion.finish_reason
            yield _event({**self.envelope(True), "choices": [self.choice(0, None, finish, delta=True)]})
            if usage:
                yield _event({**self.envelope(True), "choices": [], "usage": _usage([stream.completion])})
        except Exception as err:  # noqa: BLE001 - the status line is sent already: report in the stream
            yield _event(_error_of(err)[1])
        finally:
            stream.close()
        yield _event("[DONE]")


# ------------------------------------------------------------------ the app
def create_app(engine: ReGrad, *, max_batch: int | None = None, max_wait_ms: float = 10.0,
               model_id: str = "regrad") -> FastAPI:
    """The OpenAI-compatible app over ``engine`` (see the module docstring).

    Args:
        engine: The engine; its ``k``, ``mode``, ``gamma`` and ``max_new_tokens`` are the
            defaults of requests that do not set them.
        max_batch: Most requests generated together (default: the engine's ``batch_size``).
        max_wait_ms: How long a request waits for others to share its batch.
        model_id: The model name ``/v1/models`` lists and responses carry.
    """
    batcher = DynamicBatcher(engine, max_batch=max_batch, max_wait_ms=max_wait_ms)
    requests = _Requests(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="regrad", summary="OpenAI-compatible API with per-request document gradients",
                  lifespan=lifespan)
    app.state.batcher, app.state.engine = batcher, engine

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        if first["type"] == "json_invalid":
            message, param = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})", None
        elif param is None:
            message = "the request body must be a JSON object (Content-Type: application/json)"
        elif first["type"] == "extra_forbidden":
            message = f"unknown field {param!r}: see /docs for the fields this server reads"
        elif first["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"{param}: {first['msg']}"
        return JSONResponse(_error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException) -> JSONResponse:
        message = (f"no route {request.method} {request.url.path}: this server has /v1/chat/completions, "
                   "/v1/completions, /v1/models, /health and /ready") if err.status_code in (404, 405) else err.detail
        return JSONResponse(_error_body(message), status_code=err.status_code)

    @app.exception_handler(RegradError)  # a user's mistake (400) or the store's (500)
    @app.exception_handler(Exception)  # a bug: 500, and uvicorn logs the traceback
    async def failed(request, err: Exception) -> JSONResponse:
        status, body = _error_of(err)
        return JSONResponse(body, status_code=status)

    async def answer(body: _Request, prompts: list[Conversation], max_tokens: int | None, chat: bool):
        _refuse_unsupported(body)
        stops = _stops(body.stop)
        reply = _Reply(chat, model_id)
        if body.stream:
            if len(prompts) != 1:
                raise FieldError("stream one prompt per request", "prompt")
            job, sources = await asyncio.to_thread(requests.job, body, prompts[0], max_tokens)
            stream = await asyncio.to_thread(engine.stream_message, job.conversation, job.documents,
                                             gamma=job.gamma, max_new_tokens=job.max_new_tokens)
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(reply.events(stream, sources, stops, usage), media_type="text/event-stream")
        jobs = await asyncio.to_thread(lambda: [requests.job(body, p, max_tokens) for p in prompts])
        completions = await asyncio.gather(*(asyncio.wrap_future(batcher.submit(job)) for job, _ in jobs))
        return reply.whole(list(completions), [sources for _, sources in jobs], stops)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await answer(body, [conversation_of(body.messages)], max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not 1 <= len(prompts) <= MAX_PROMPTS:
            raise FieldError(f"send 1 to {MAX_PROMPTS} prompts, got {len(prompts)}", "prompt")
        return await answer(body, _checked("prompt", check_conversations, prompts), body.max_tokens, chat=False)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "regrad"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != model_id:
            return JSONResponse(_error_body(f"no model {name!r}: this server serves {model_id!r}", param="model",
                                            code="model_not_found"), status_code=404)
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not batcher.running:
            return JSONResponse({"status": "not ready", "reason": "the batch worker is not running"}, status_code=503)
        return {"status": "ready", "model": model_id, "batches": batcher.stats.batches}

    return app


def serve(engine: ReGrad, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **app_kwargs: Any) -> None:
    """Run the app with uvicorn until interrupted (``app_kwargs`` go to :func:`create_app`)."""
    import uvicorn

    uvicorn.run(create_app(engine, **app_kwargs), host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a background thread (tests, notebooks, benchmarks) and yield its base
    URL (``port=0``: a free port, bound before the thread starts); stopped on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="regrad-server", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RegradError("the server did not start: see the log above")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
