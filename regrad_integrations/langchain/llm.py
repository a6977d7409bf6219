"""ReGradLLM: a text-completion LLM that answers with the gradients of its call's documents."""

from __future__ import annotations

from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.llms import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult
from pydantic import Field, PrivateAttr, model_validator

from regrad_engine.inference import ReGrad
from regrad_integrations.langchain._base import (
    EngineBound,
    call_options,
    check_engine_or_store,
    check_no_cache,
    cut_at_stop,
    explicit_documents,
    generation_info,
    handed_documents,
    parent_run,
    prepare,
    stream_text,
    track_runs,
    usage,
)

# BaseLLM passes only the first prompt's run manager to _generate; each prompt's is kept here.
_run_managers: ContextVar[list | None] = ContextVar("regrad_llm_run_managers", default=None)


class ReGradLLM(EngineBound, BaseLLM):
    """Text-completion LLM that answers with the gradients of its call's documents.

    The documents are those a :class:`ReGradRetriever` returned in the same invocation
    (handed over through the run tree), or ``documents=`` given to the call. Outside any
    chain, registered documents found in the prompt text are used. In ``parametric`` mode
    their text is cut out of the prompt (found however ``format_docs`` wrote it: case,
    whitespace, escapes and truncation are tolerated); in ``hybrid`` mode the prompt is read
    as rendered, with any document it lacks put before it. A parametric call with no
    documents warns (``NoDocumentsWarning``), or raises with ``strict=True``.

    Per-call overrides (e.g. ``llm.bind(mode="hybrid")``): ``mode``, ``gamma``,
    ``max_new_tokens``, ``documents``; other keyword arguments go to ``model.generate``.
    ``generation_info`` holds ``sources`` (document ids), ``mode`` and ``finish_reason``;
    ``llm_output`` holds ``token_usage`` and ``model_name``.

    No LLM cache: an answer depends on the documents the call is handed, which LangChain's
    cache key does not hold (nor, for ``BaseLLM``, the bound call options:
    langchain-ai/langchain#40403), so a cached answer would be replayed for other documents.
    """

    engine: ReGrad | None = Field(None, exclude=True, description="The ReGrad engine (model, meta checkpoint, "
                                                                  "bank); or give store.")
    store: str | None = Field(None, description="Store directory to open the engine from (recorded when the engine "
                                                "came from one: this is what serialisation keeps).")
    mode: Literal["parametric", "hybrid"] = Field(
        "parametric", description="parametric: passages cut from the prompt, knowledge from gradients only; "
                                  "hybrid: gradients plus the passages in the prompt.")
    gamma: float = Field(1.0, description="Test-time step scale of the gradient update.")
    max_new_tokens: int = Field(64, ge=1, description="Longest answer, in tokens.")
    strict: bool = Field(False, description="Raise instead of warning when a parametric call gets no documents.")
    cache: Any = Field(False, description="Always False: answers depend on each call's documents, which LangChain's "
                                          "cache key does not hold.")
    _fingerprint: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _engine_or_store(self) -> ReGradLLM:
        self.store = check_engine_or_store(self.engine, self.store)
        check_no_cache(self.cache)
        track_runs()
        return self

    @property
    def _llm_type(self) -> str:
        return "regrad"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        engine = self.regrad_engine
        if self._fingerprint is None:  # hashes phi and alpha: once per object
            self._fingerprint = engine.meta.fingerprint()
        return {"model_name": engine.meta.base_model, "meta_fingerprint": self._fingerprint,
                "mode": self.mode, "gamma": self.gamma, "max_new_tokens": self.max_new_tokens}

    def _generate_helper(self, prompts: list[str], stop: list[str] | None, run_managers: list, **kwargs: Any
                         ) -> LLMResult:
        token = _run_managers.set(run_managers)
        try:
            return super()._generate_helper(prompts, stop, run_managers, **kwargs)
        finally:
            _run_managers.reset(token)

    async def _agenerate_helper(self, prompts: list[str], stop: list[str] | None, run_managers: list,
                                **kwargs: Any) -> LLMResult:
        token = _run_managers.set(run_managers)
        try:
            return await super()._agenerate_helper(prompts, stop, run_managers, **kwargs)
        finally:
            _run_managers.reset(token)

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        engine = self.regrad_engine
        mode, gamma, options = call_options(kwargs, self.mode, self.gamma, self.max_new_tokens)
        explicit = explicit_documents(options.pop("documents", None))
        managers = _run_managers.get()
        if not managers or len(managers) != len(prompts):
            managers = [run_manager] * len(prompts)
        messages, documents = [], []
        for prompt, manager in zip(prompts, managers):
            handed = explicit if explicit is not None else handed_documents(parent_run(manager))
            turns, hits = prepare(engine, [{"role": "user", "content": prompt}], mode, handed, strict=self.strict)
            messages.append(turns[0]["content"] if len(turns) == 1 else turns)
            documents.append(hits)
        completions = engine.complete(messages, documents, gamma=gamma, **options)
        return LLMResult(
            generations=[[Generation(text=cut_at_stop(c.text, stop), generation_info=generation_info(hits, mode,
                                                                                                     c.finish_reason))]
                         for c, hits in zip(completions, documents)],
            llm_output={"token_usage": usage(completions), "model_name": engine.meta.base_model})

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        engine = self.regrad_engine
        mode, gamma, options = call_options(kwargs, self.mode, self.gamma, self.max_new_tokens)
        explicit = explicit_documents(options.pop("documents", None))
        handed = explicit if explicit is not None else handed_documents(parent_run(run_manager))
        turns, hits = prepare(engine, [{"role": "user", "content": prompt}], mode, handed, strict=self.strict)
        pieces = engine.stream_message(turns[0]["content"] if len(turns) == 1 else turns, hits, gamma=gamma,
                                       **options)
        info: dict | None = generation_info(hits, mode, None)
        try:
            for text in stream_text(pieces, stop):
                chunk = GenerationChunk(text=text, generation_info=info)
                info = None
                if run_manager is not None:
                    run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
        finally:
            pieces.close()  # generation stops at its next step (stop sequence met, stream closed)
        if info is not None:  # empty answer: still report the sources
            yield GenerationChunk(text="", generation_info=info)
