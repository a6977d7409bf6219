"""LangChain adapter: swap the retriever and the LLM of a RAG chain for ReGrad.

The usual chain keeps its shape::

    llm, retriever = regrad_langchain(engine)
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm

:class:`ReGradRetriever` returns the engine's documents (or another retriever's) and registers
them; :class:`ReGradLLM` finds the registered documents in the prompt it receives. Those are
the documents of this very invocation (the prompt carries them), so the LLM applies exactly
their gradients, with no second retrieval, and parallel invocations, ``batch``, ``abatch`` and
threads cannot mix documents. In ``parametric`` mode their text is cut out of the prompt
before the model reads it; in ``hybrid`` mode the prompt is read as rendered.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForRetrieverRun,
        CallbackManagerForLLMRun,
        CallbackManagerForRetrieverRun,
    )
    from langchain_core.documents import Document
    from langchain_core.language_models.llms import BaseLLM
    from langchain_core.outputs import Generation, GenerationChunk, LLMResult
    from langchain_core.retrievers import BaseRetriever
except ImportError as err:  # pragma: no cover - exercised with langchain-core hidden
    raise ImportError("the LangChain adapter needs langchain-core: pip install 'regrad[langchain]'") from err

import torch
from pydantic import Field, PrivateAttr
from transformers import StoppingCriteria, StoppingCriteriaList

from regrad_engine.errors import check_gamma, check_k, check_mode
from regrad_engine.inference import ReGrad
from regrad_engine.retrieval.base import Hit
from regrad_integrations._registry import prompt_documents, registry_for

__all__ = ["ReGradLLM", "ReGradRetriever", "regrad_langchain"]


class ReGradRetriever(BaseRetriever):
    """Retriever whose documents a :class:`ReGradLLM` over the same engine will adapt to.

    Documents come from the engine's own index, or from ``base_retriever`` (any LangChain
    retriever). A document's id is ``metadata[id_key]``, else ``Document.id``, else the sha1
    of its text; a document whose gradient is not in the bank gets it computed on the fly
    (the engine's ``on_the_fly`` setting).
    """

    engine: ReGrad = Field(exclude=True, description="The ReGrad engine (index, bank, model).")
    k: int = Field(3, ge=1, description="Documents per query; also caps base_retriever's list.")
    base_retriever: BaseRetriever | None = Field(None, description="Another retriever to take documents from.")
    id_key: str = Field("id", description="Metadata key holding the id of base_retriever's documents.")

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        k = self._check_k(k)
        if self.base_retriever is None:
            return self._documents(self.engine.retrieve([query], k)[0])
        docs = self.base_retriever.invoke(query, config={"callbacks": run_manager.get_child()})
        return self._documents([self._hit(doc) for doc in docs[:k]])

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: int | None = None) -> list[Document]:
        k = self._check_k(k)
        if self.base_retriever is None:
            return self._documents((await asyncio.to_thread(self.engine.retrieve, [query], k))[0])
        docs = await self.base_retriever.ainvoke(query, config={"callbacks": run_manager.get_child()})
        return self._documents([self._hit(doc) for doc in docs[:k]])

    def _check_k(self, k: int | None) -> int:
        return check_k(self.k if k is None else k)

    def _hit(self, doc: Document) -> Hit:
        doc_id = doc.metadata.get(self.id_key) or doc.id or hashlib.sha1(doc.page_content.encode()).hexdigest()
        score = doc.metadata.get("score", 0.0)
        return Hit(id=str(doc_id), text=doc.page_content,
                   score=float(score) if isinstance(score, (int, float)) else 0.0, metadata=dict(doc.metadata))

    def _documents(self, hits: Sequence[Hit]) -> list[Document]:
        registry_for(self.engine).register(hits)
        return [Document(id=h.id, page_content=h.text, metadata={**h.metadata, "id": h.id, "score": h.score})
                for h in hits]


class ReGradLLM(BaseLLM):
    """Text-completion LLM that answers with the gradients of the documents in its prompt.

    The documents are those a :class:`ReGradRetriever` over the same engine returned and the
    prompt contains verbatim (e.g. through a ``{context}`` slot). A prompt with none of them
    runs the meta-learned phi without any document update. Per-call overrides (e.g.
    ``llm.bind(mode="hybrid")``): ``mode``, ``gamma``, ``max_new_tokens``; other keyword
    arguments go to ``model.generate``. ``generation_info`` holds ``sources`` (document ids)
    and ``mode``.

    With an LLM cache, choose the mode with the field or ``configurable_fields``, not ``bind``:
    langchain-core's ``BaseLLM`` leaves per-call options out of the cache key
    (langchain-ai/langchain#40403), so a cached parametric answer would be replayed for hybrid.
    """

    engine: ReGrad = Field(exclude=True, description="The ReGrad engine (model, meta checkpoint, bank).")
    mode: Literal["parametric", "hybrid"] = Field(
        "parametric", description="parametric: passages cut from the prompt, knowledge from gradients only; "
                                  "hybrid: gradients plus the prompt as rendered.")
    gamma: float = Field(1.0, description="Test-time step scale of the gradient update.")
    max_new_tokens: int = Field(64, ge=1, description="Longest answer, in tokens.")
    _fingerprint: str | None = PrivateAttr(None)

    @property
    def _llm_type(self) -> str:
        return "regrad"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        if self._fingerprint is None:  # hashes phi and alpha: once per object
            self._fingerprint = self.engine.meta.fingerprint()
        return {"model_name": self.engine.meta.base_model, "meta_fingerprint": self._fingerprint,
                "mode": self.mode, "gamma": self.gamma, "max_new_tokens": self.max_new_tokens}

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        mode, gamma, options = self._options(kwargs)
        requests = [prompt_documents(self.engine, prompt, mode)[:2] for prompt in prompts]
        texts = self.engine.complete_batch([message for message, _ in requests], [hits for _, hits in requests],
                                           gamma=gamma, **options)
        return LLMResult(generations=[[Generation(text=_cut_at_stop(text, stop), generation_info=_info(hits, mode))]
                                      for text, (_, hits) in zip(texts, requests)])

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        mode, gamma, options = self._options(kwargs)
        message, hits, _ = prompt_documents(self.engine, prompt, mode)
        cancel = _Cancel()  # stops generating once we stop reading (stop sequence, closed stream)
        options["stopping_criteria"] = StoppingCriteriaList([*options.get("stopping_criteria", ()), cancel])
        pieces = self.engine.stream_message(message, hits, gamma=gamma, **options)
        info: dict | None = _info(hits, mode)
        try:
            for text in _stream_text(pieces, stop):
                chunk = GenerationChunk(text=text, generation_info=info)
                info = None
                if run_manager is not None:
                    run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk
        finally:
            cancel.event.set()
            pieces.close()
        if info is not None:  # empty answer: still report the sources
            yield GenerationChunk(text="", generation_info=info)

    def _options(self, kwargs: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
        """(mode, gamma, generate options) with this call's overrides applied."""
        options = dict(kwargs)
        mode = check_mode(options.pop("mode", self.mode))
        gamma = check_gamma(options.pop("gamma", self.gamma))
        options["max_new_tokens"] = int(options.get("max_new_tokens", self.max_new_tokens))
        return mode, gamma, options




def regrad_langchain(engine: ReGrad, *, mode: Literal["parametric", "hybrid"] = "parametric",
                     k: int = 3) -> tuple[ReGradLLM, ReGradRetriever]:
    """The LLM and retriever to put in a LangChain RAG chain in place of the usual pair."""
    return ReGradLLM(engine=engine, mode=mode), ReGradRetriever(engine=engine, k=k)


class _Cancel(StoppingCriteria):
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _info(hits: Sequence[Hit], mode: str) -> dict[str, Any]:
    return {"sources": [hit.id for hit in hits], "mode": mode}


def _first_stop(text: str, stop: Sequence[str] | None) -> int | None:
    found = [i for s in stop or () if s and (i := text.find(s)) != -1]
    return min(found) if found else None


def _cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    cut = _first_stop(text, stop)
    return text if cut is None else text[:cut].rstrip()


def _stream_text(pieces: Iterable[str], stop: Sequence[str] | None) -> Iterator[str]:
    """The pieces re-cut so they join to exactly what ``_generate`` returns: outer whitespace
    dropped, cut at the first stop sequence. Text that may start a stop sequence, or is
    trailing whitespace, is held back until the next piece decides."""
    stops = [s for s in stop or () if s]
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
