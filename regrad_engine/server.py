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
The wire format (request bodies, refusals, answer and chunk shapes) is ``openai_format.py``;
this module turns requests into jobs and serves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

try:
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the server needs fastapi and uvicorn: pip install 'regrad[serve]'") from err

from regrad_engine.bank import text_hash
from regrad_engine.batching import DynamicBatcher, Job
from regrad_engine.errors import RegradError, check_conversations, check_gamma, check_k, check_mode
from regrad_engine.inference import ReGrad
from regrad_engine.openai_format import (
    MAX_PROMPTS,
    ChatRequest,
    CompletionRequest,
    FieldError,
    OpenAIRequest,
    Reply,
    checked,
    conversation_of,
    error_body,
    error_of,
    query_of,
    refuse_unsupported,
    stop_sequences,
)
from regrad_engine.prompts import Conversation, with_passages
from regrad_engine.retrieval.base import Hit

logger = logging.getLogger(__name__)

MAX_DOCUMENTS = 32  # per request: each document outside the bank costs a backward pass


class _Requests:
    """Turns checked request bodies into :class:`Job` s (blocking: run it in a thread)."""

    def __init__(self, engine: ReGrad) -> None:
        self.engine = engine

    def job(self, body: OpenAIRequest, conversation: Conversation, max_tokens: int | None) -> tuple[Job, list[dict]]:
        engine = self.engine
        mode = checked("mode", check_mode, engine.mode if body.mode is None else body.mode)
        gamma = checked("gamma", check_gamma, engine.gamma if body.gamma is None else body.gamma)
        max_new = checked("max_tokens", check_k, engine.max_new_tokens if max_tokens is None else max_tokens,
                          "max_tokens")
        k = checked("k", check_k, engine.k if body.k is None else body.k)
        if k > MAX_DOCUMENTS:
            raise FieldError(f"k must be at most {MAX_DOCUMENTS}, got {k}", "k")
        if not isinstance(body.use_gradients, bool):
            raise FieldError(f"use_gradients must be true or false, got {body.use_gradients!r}", "use_gradients")
        if not body.use_gradients and mode == "parametric":
            named = []  # neither gradients nor passages: documents would change nothing
        elif body.documents is not None:
            named = self.documents(body.documents)
        else:
            named = [(hit, hit.id) for hit in engine.retrieve([query_of(conversation)], k)[0]]
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
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException) -> JSONResponse:
        message = (f"no route {request.method} {request.url.path}: this server has /v1/chat/completions, "
                   "/v1/completions, /v1/models, /health and /ready") if err.status_code in (404, 405) else err.detail
        return JSONResponse(error_body(message), status_code=err.status_code)

    @app.exception_handler(RegradError)  # a user's mistake (400) or the store's (500)
    @app.exception_handler(Exception)  # a bug: 500, and uvicorn logs the traceback
    async def failed(request, err: Exception) -> JSONResponse:
        status, body = error_of(err)
        return JSONResponse(body, status_code=status)

    async def answer(body: OpenAIRequest, prompts: list[Conversation], max_tokens: int | None, chat: bool):
        refuse_unsupported(body)
        stops = stop_sequences(body.stop)
        reply = Reply(chat, model_id)
        if body.stream:
            if len(prompts) != 1:
                raise FieldError("stream one prompt per request", "prompt")
            job, sources = await asyncio.to_thread(requests.job, body, prompts[0], max_tokens)
            stream = await asyncio.to_thread(engine.stream_message, job.conversation, job.documents,
                                             gamma=job.gamma, max_new_tokens=job.max_new_tokens)
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(reply.events(stream, sources, stops, usage),
                                     media_type="text/event-stream")
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
        return await answer(body, checked("prompt", check_conversations, prompts), body.max_tokens, chat=False)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "regrad"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != model_id:
            return JSONResponse(error_body(f"no model {name!r}: this server serves {model_id!r}", param="model",
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
