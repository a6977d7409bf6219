"""What the LangChain adapters share: the run-tree hand-off, documents, options, stop cutting.

The hand-off: once a ReGrad adapter exists, a callback handler (installed through
langchain-core's configure hook, so every run gets it) records each chain and tool run
with its parent. A :class:`ReGradRetriever` hands its documents to the runs above it; the
LLM or chat model of the same invocation takes them from its nearest ancestor that holds
some (:mod:`regrad_integrations._handoff`). Two invocations are two run trees, so they
cannot see each other's documents, and nothing depends on how ``format_docs`` wrote them
into the prompt. Only a call outside any chain falls back to text matching (documents a
retriever returned outside any chain, found in the prompt).
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.tracers.context import register_configure_hook

from regrad_engine.errors import RequestError, check_gamma, check_mode
from regrad_engine.prompts import with_passages
from regrad_engine.retrieval.base import Hit
from regrad_integrations._handoff import NoDocumentsWarning, RunScopes
from regrad_integrations._registry import prompt_documents, registry_for

SCOPES = RunScopes()


class _RunTree(BaseCallbackHandler):
    """Records where chain, tool and retriever runs sit in their run tree (for the hand-off).

    Not ``run_inline``: langchain-core would then send async LLM events to inline handlers
    only, starving every other handler (``astream_events``, tracers) of them. Async
    managers await every handler before the run goes on, so the tree is still complete
    before the model starts."""

    def on_chain_start(self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None,
                       **kwargs: Any) -> None:
        SCOPES.started(run_id, parent_run_id, boundary=_is_sequence(serialized, kwargs))

    def on_tool_start(self, serialized: Any, input_str: str, *, run_id: UUID, parent_run_id: UUID | None = None,
                      **kwargs: Any) -> None:
        SCOPES.started(run_id, parent_run_id)

    def on_retriever_start(self, serialized: Any, query: str, *, run_id: UUID, parent_run_id: UUID | None = None,
                           **kwargs: Any) -> None:
        SCOPES.started(run_id, parent_run_id)  # a retriever wrapping a ReGradRetriever hands on its documents

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        SCOPES.ended(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        SCOPES.ended(run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        SCOPES.ended(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        SCOPES.ended(run_id)

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        SCOPES.ended(run_id)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        SCOPES.ended(run_id)


def _is_sequence(serialized: Any, kwargs: Mapping[str, Any]) -> bool:
    """A chain (``RunnableSequence``, ``prompt | model | parser``): a model inside it takes
    the documents of its own chain, never those of a chain run beside it."""
    ids = serialized.get("id") if isinstance(serialized, Mapping) else None
    return (bool(ids) and ids[-1] == "RunnableSequence") or kwargs.get("name") == "RunnableSequence"


_run_tree = ContextVar("regrad_run_tree", default=_RunTree())
_hooked = False
_hook_lock = threading.Lock()


def track_runs() -> None:
    """Have every LangChain run from now on report its place in the run tree (idempotent;
    called when the first ReGrad adapter object is made, not at import)."""
    global _hooked
    with _hook_lock:
        if not _hooked:
            register_configure_hook(_run_tree, inheritable=True)
            _hooked = True


def hand_over(engine: object, parent_run_id: UUID | None, hits: Sequence[Hit]) -> None:
    """A retriever's documents: to the runs above it, or (outside any chain) to the
    text-matching fallback."""
    if not SCOPES.add(parent_run_id, hits):
        registry_for(engine).register(hits)


def parent_run(run_manager: Any) -> UUID | None:
    """The run a model call runs under: its run manager's parent, else (langchain-core's
    ``BaseChatModel.stream`` gives ``_stream`` no run manager) the parent that the running
    chain set in langchain-core's config context."""
    if run_manager is not None:
        return run_manager.parent_run_id
    from langchain_core.runnables.config import var_child_runnable_config

    callbacks = (var_child_runnable_config.get() or {}).get("callbacks")
    return getattr(callbacks, "parent_run_id", None)


def handed_documents(parent_run_id: UUID | None) -> list[Hit] | None:
    """The documents handed to this call through its run tree ([] in a tree that handed
    none); None outside any chain, where text matching is the fallback."""
    if not SCOPES.known(parent_run_id):
        return None
    return SCOPES.find(parent_run_id) or []


def document_to_hit(doc: Document | Hit | str, id_key: str = "id") -> Hit:
    """Any LangChain document (or text) as an engine document. Its id is
    ``metadata[id_key]``, else ``Document.id``, else the sha1 of its text."""
    if isinstance(doc, Hit):
        return doc
    if isinstance(doc, str):
        if not doc.strip():
            raise RequestError("a document given as text is blank: leave it out")
        return Hit(id=hashlib.sha1(doc.encode()).hexdigest(), text=doc, score=0.0)
    if not isinstance(doc, Document):
        raise RequestError(f"documents must be LangChain Documents or strings, got {type(doc).__name__}")
    if not doc.page_content.strip():
        raise RequestError(f"document {doc.id or doc.metadata.get(id_key)!r} has no text: leave it out")
    doc_id = doc.metadata.get(id_key) or doc.id or hashlib.sha1(doc.page_content.encode()).hexdigest()
    score = doc.metadata.get("score", 0.0)
    return Hit(id=str(doc_id), text=doc.page_content,
               score=float(score) if isinstance(score, (int, float)) else 0.0, metadata=dict(doc.metadata))


def hit_to_document(hit: Hit) -> Document:
    return Document(id=hit.id, page_content=hit.text, metadata={**hit.metadata, "id": hit.id, "score": hit.score})


def explicit_documents(value: Any) -> list[Hit] | None:
    """The ``documents=`` call option as engine documents (None: not given)."""
    if value is None:
        return None
    if isinstance(value, (str, Document, Hit)) or not isinstance(value, Iterable):
        raise RequestError("documents= takes a list of Documents or strings, e.g. documents=retriever.invoke(q)")
    return [document_to_hit(doc) for doc in value]


def prepare(engine: Any, turns: Sequence[Mapping[str, str]], mode: str, handed: Sequence[Hit] | None, *,
            strict: bool) -> tuple[list[dict[str, str]], list[Hit]]:
    """The conversation the model reads, and the documents whose gradients it gets.

    ``handed`` documents (run tree, tool artifacts or ``documents=``) are found in every
    turn and, in parametric mode, cut out; in hybrid mode those not in the prompt are put
    before the last user turn. Without ``handed``, registered texts found in the turns are
    the documents. A parametric call with no documents warns (raises with ``strict``)."""
    out: list[dict[str, str]] = []
    found: dict[str, Hit] = {}
    located: set[str] = set()
    for turn in turns:
        content, hits, missing = prompt_documents(engine, turn["content"], mode, handed)
        if handed is None:
            found.update((h.id, h) for h in hits)
        else:
            located |= {h.id for h in hits} - {h.id for h in missing}
        out.append({"role": turn["role"], "content": content})
    hits = list(handed) if handed is not None else list(found.values())
    if handed is not None and mode == "hybrid":
        absent = [h for h in handed if h.id not in located]
        if absent:
            out = with_passages(out, [h.text for h in absent])
    if not hits and mode == "parametric":
        message = ("parametric mode, but no documents reached this call (no ReGradRetriever ran in this chain "
                   "and no documents= was given): it answers without any document's knowledge. Put a "
                   "ReGradRetriever in the chain or pass documents=...; strict=True makes this an error")
        if strict:
            raise RequestError(message)
        warnings.warn(message, NoDocumentsWarning, stacklevel=4)
    return out, hits


def call_options(kwargs: Mapping[str, Any], mode: str, gamma: float, max_new_tokens: int | None
                 ) -> tuple[str, float, dict[str, Any]]:
    """(mode, gamma, generate options) of one call, its overrides applied and checked."""
    options = dict(kwargs)
    mode = check_mode(options.pop("mode", mode))
    gamma = check_gamma(options.pop("gamma", gamma))
    options.pop("model", None)  # a per-call model name: traced, but one engine serves one model
    new = options.pop("max_new_tokens", options.pop("max_tokens", max_new_tokens))
    if new is not None:
        options["max_new_tokens"] = new
    return mode, gamma, options


def _stops(stop: Sequence[str] | str | None) -> list[str]:
    return [stop] if isinstance(stop, str) else [s for s in stop or () if s]


def _first_stop(text: str, stop: Sequence[str] | str | None) -> int | None:
    found = [i for s in _stops(stop) if (i := text.find(s)) != -1]
    return min(found) if found else None


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    cut = _first_stop(text, stop)
    return text if cut is None else text[:cut].rstrip()


def stream_text(pieces: Iterable[str], stop: Sequence[str] | None) -> Iterator[str]:
    """The pieces re-cut so they join to exactly what the non-streamed call returns: outer
    whitespace dropped, cut at the first stop sequence. Text that may start a stop
    sequence, or is trailing whitespace, is held back until the next piece decides."""
    stops = _stops(stop)
    pending, started = "", False
    for piece in pieces:
        pending += piece
        if not started:
            pending = pending.lstrip()
            started = bool(pending)
        cut = _first_stop(pending, stops)
        if cut is not None:
            if pending[:cut].rstrip():
                yield pending[:cut].rstrip()
            return
        partial = max([0] + [n for s in stops for n in range(1, len(s)) if pending.endswith(s[:n])])
        ready = pending[:len(pending) - partial].rstrip()  # whitespace waits for what follows
        if ready:
            yield ready
            pending = pending[len(ready):]
    if pending.rstrip():
        yield pending.rstrip()


_engines: dict[str, Any] = {}
_engines_lock = threading.Lock()


def engine_of(store: str) -> Any:
    """The engine of a store directory, opened once per process (for adapters made from
    their serialised form, which names the store instead of holding an engine)."""
    from pathlib import Path

    from regrad_engine.store import open_engine

    key = str(Path(store).resolve())
    with _engines_lock:
        if key not in _engines:
            _engines[key] = open_engine(key)
        return _engines[key]


class EngineBound:
    """What ReGrad's LangChain models share: an engine given, or opened from ``store`` on
    first use; serialisable as that store; the engine's own tokenizer for token counts."""

    engine: Any
    store: str | None

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["regrad_integrations", "langchain"]

    @property
    def regrad_engine(self) -> Any:
        """The engine (opened from ``store`` on first use if none was given)."""
        return self.engine if self.engine is not None else engine_of(self.store)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids by the engine's own tokenizer (no download)."""
        return self.regrad_engine.tokenizer(text, add_special_tokens=False)["input_ids"]


NO_CACHE = ("answers depend on the documents each call is handed, which are not part of LangChain's cache key: "
            "ReGrad models do not use an LLM cache (leave cache at False)")


def check_no_cache(cache: Any) -> None:
    if cache not in (None, False):
        raise ValueError(NO_CACHE)


def check_engine_or_store(engine: Any, store: str | None) -> str | None:
    """The store to record for serialisation; an error if neither is given."""
    if engine is None and store is None:
        raise ValueError("pass engine=open_engine('my-store') or store='my-store' (a store made by `regrad build`)")
    return store if store is not None else getattr(engine, "store_dir", None)


def usage(completions: Sequence[Any]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    done = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def generation_info(hits: Sequence[Hit], mode: str, finish_reason: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {"sources": [hit.id for hit in hits], "mode": mode}
    if finish_reason is not None:
        info["finish_reason"] = finish_reason
    return info
