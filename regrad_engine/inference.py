"""Stage 3: retrieve -> fetch -> sum -> phi' -> generate -> keep nothing.

Every request gets its own adapted factors phi' = phi - gamma * alpha (.) sum_j g(d_j),
passed to the model as per-sample LoRA inputs (see ``lora.LoraSpace``); nothing shared is
written, so requests can run concurrently and batched, each with its own documents.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextvars import copy_context
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from regrad_engine.bank import GradientBank, text_hash
from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.errors import (
    BankError,
    RequestError,
    check_gamma,
    check_k,
    check_mode,
    check_request,
    check_texts,
)
from regrad_engine.gradients import document_gradients
from regrad_engine.lora import LoraSpace, Phi, apply_update
from regrad_engine.prompts import (
    encode_documents,
    encode_messages,
    message_prompt,
    pad_id,
    turn_marker_ids,
    user_message,
)
from regrad_engine.retrieval.base import Hit, Retriever


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """A generated answer with the documents whose gradients (and text, in hybrid) it used."""

    question: str
    text: str
    mode: str
    sources: list[Hit] = field(default_factory=list)
    gamma: float = 1.0


class ReGrad:
    """The ReGrad engine over one frozen model, meta checkpoint, bank and retriever.

    Args:
        model: Frozen causal LM with ``space`` installed.
        tokenizer: Its tokenizer (chat template required).
        space: Adaptation space (from the checkpoint's LoRA spec).
        meta: Meta-learned phi and alpha.
        retriever: Finds documents for a question (optional if documents are passed in).
        bank: Stored gradients by document id (optional: missing gradients are computed).
        k: Default number of documents per question.
        gamma: Default test-time step scale.
        mode: Default mode, ``"parametric"`` or ``"hybrid"``.
        max_new_tokens: Generation length.
        doc_max_tokens: Tokens per document for on-the-fly gradients (must match the bank).
        on_the_fly: Compute gradients of documents missing from the bank (else error).
        write_back: Store on-the-fly gradients into the bank.
        batch_size: Questions generated together.
        max_prompt_tokens: Longest prompt accepted (default: the model's context minus
            ``max_new_tokens``); a longer one is refused at once with a RequestError.
    """

    def __init__(self, model: nn.Module, tokenizer, space: LoraSpace, meta: MetaCheckpoint, *,
                 retriever: Retriever | None = None, bank: GradientBank | None = None, k: int = 3,
                 gamma: float = 1.0, mode: str = "parametric", max_new_tokens: int = 20,
                 doc_max_tokens: int = 200, on_the_fly: bool = True, write_back: bool = False,
                 batch_size: int = 16, max_prompt_tokens: int | None = None) -> None:
        self.model, self.tokenizer, self.space, self.meta = model, tokenizer, space, meta
        self.retriever, self.bank = retriever, bank
        self.k, self.gamma, self.mode = check_k(k), check_gamma(gamma), check_mode(mode)
        self.max_new_tokens, self.doc_max_tokens = max_new_tokens, doc_max_tokens
        self.on_the_fly, self.write_back, self.batch_size = on_the_fly, write_back, batch_size
        self.device = next(model.parameters()).device
        self.phi = {k_: v.to(self.device, torch.float32) for k_, v in meta.phi.items()}
        self.alpha = {k_: v.to(self.device, torch.float32) for k_, v in meta.alpha.items()}
        self._bank_lock = threading.Lock()  # bank objects are not thread-safe
        self._stop_ids = turn_marker_ids(tokenizer)  # an answer ends at any turn marker
        self._warned_missing = False
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._context = context if isinstance(context, int) else None
        self._prompt_limit = None if max_prompt_tokens is None else check_k(max_prompt_tokens, "max_prompt_tokens")

    # ------------------------------------------------------------ retrieval + gradients
    def retrieve(self, questions: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-k hits per question from the configured retriever."""
        questions = check_request(questions, k=k)
        if self.retriever is None:
            raise RequestError("no retriever configured: pass documents=... or build an index")
        return self.retriever.retrieve_batch(list(questions), k)

    def document_gradients(self, hits: Sequence[Hit], batch_size: int = 8) -> dict[str, Phi]:
        """Gradients of these documents at phi, computed now: id -> unbatched gradient."""
        out: dict[str, Phi] = {}
        unique = list({h.id: h for h in hits}.values())
        for start in range(0, len(unique), batch_size):
            chunk = unique[start:start + batch_size]
            docs = {k: v.to(self.device) for k, v in
                    encode_documents(self.tokenizer, [h.text for h in chunk], self.doc_max_tokens).items()}
            grads = document_gradients(self.model, self.space, self.phi, docs)
            for row, hit in enumerate(chunk):
                out[hit.id] = {k: g[row].detach() for k, g in grads.items()}
        return out

    def gradient_sums(self, hits_lists: Sequence[Sequence[Hit]]) -> Phi:
        """Batched sums of the documents' gradients: (b, *shape), one row per request."""
        with self._bank_lock:
            stored = self.bank is not None
            missing = [h for hits in hits_lists for h in hits if not (stored and h.id in self.bank)]
        if missing and not self.on_the_fly:
            raise RequestError(f"document {missing[0].id!r} has no stored gradient: add it with "
                               "`regrad build` or enable on_the_fly")
        if missing and self.bank is not None and not self._warned_missing:
            self._warned_missing = True  # once per engine: a store whose bank lags its index
            logger.warning("%d retrieved documents (e.g. %r) have no stored gradient: computing them now; run "
                           "`regrad build` (or `regrad verify`) on the store to store them", len(missing), missing[0].id)
        computed = self.document_gradients(missing) if missing else {}
        broken = [d for d, grad in computed.items() if not all(bool(torch.isfinite(g).all()) for g in grad.values())]
        if broken:  # never applied, never stored
            raise RequestError(f"document {broken[0]!r} gives a non-finite (NaN/Inf) gradient at this checkpoint: "
                               "remove it from the corpus or pass other documents")
        with self._bank_lock:
            if computed and self.write_back and self.bank is not None:
                self._write_back(computed, {h.id: h.text for h in missing})
            if self.bank is not None:
                id_lists = [[h.id for h in hits if h.id not in computed] for hits in hits_lists]
                sums = {k: v.to(self.device) for k, v in self.bank.sum_batch(id_lists).items()}
            else:
                sums = {k: torch.zeros((len(hits_lists), *v.shape), device=self.device) for k, v in self.phi.items()}
        for row, hits in enumerate(hits_lists):
            for hit in hits:
                if hit.id in computed:
                    for key in sums:
                        sums[key][row] += computed[hit.id][key]
        return sums

    def _write_back(self, computed: Mapping[str, Phi], texts: Mapping[str, str]) -> None:
        """Store on-the-fly gradients (with their text hashes) and give the writer lock back at
        once. A bank another process is writing, or a read-only one, is left alone: the
        answer does not depend on it."""
        try:
            for doc_id, grad in computed.items():
                if doc_id not in self.bank:
                    self.bank.add(doc_id, {k: v.cpu() for k, v in grad.items()}, text_hash=text_hash(texts[doc_id]))
            self.bank.done_writing()
        except BankError as err:
            logger.warning("not storing %d on-the-fly gradients: %s", len(computed), err)

    def adapted_factors(self, hits_lists: Sequence[Sequence[Hit]], gamma: float) -> Phi:
        """phi' per request: (b, *shape)."""
        return apply_update(self.phi, self.gradient_sums(hits_lists), self.alpha, gamma)

    # ------------------------------------------------------------ generation
    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[str] | None] | None,
                 factors: Mapping[str, Tensor] | None, **generate_kwargs) -> list[str]:
        """Greedy, left-padded batched generation with per-sample factors (or none)."""
        messages = [user_message(q, passages[i] if passages else None) for i, q in enumerate(questions)]
        return self.generate_messages(messages, factors, **generate_kwargs)

    def generate_messages(self, messages: Sequence[str], factors: Mapping[str, Tensor] | None, *,
                          max_new_tokens: int | None = None, **generate_kwargs) -> list[str]:
        """Generate from ready user messages (wrapped in the chat template), batched."""
        batch = {k: v.to(self.device) for k, v in encode_messages(self.tokenizer, messages).items()}
        with self.space.activate(factors), torch.no_grad():
            output = self.model.generate(**batch, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                         do_sample=False, temperature=None, top_p=None, top_k=None,
                                         pad_token_id=pad_id(self.tokenizer),
                                         eos_token_id=self._stop_ids, **generate_kwargs)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    @property
    def max_prompt_tokens(self) -> int | None:
        """Longest prompt accepted with the default answer length (None: no limit known)."""
        return self.prompt_limit()

    def prompt_limit(self, max_new_tokens: int | None = None) -> int | None:
        """Longest prompt for an answer of ``max_new_tokens`` (default: the engine's): the
        ``max_prompt_tokens`` given, else the model's context minus the answer."""
        if self._prompt_limit is not None or self._context is None:
            return self._prompt_limit
        return self._context - (self.max_new_tokens if max_new_tokens is None else check_k(max_new_tokens,
                                                                                          "max_new_tokens"))

    def check_prompts(self, messages: Sequence[str], max_new_tokens: int | None = None) -> None:
        """Refuse, before any work, a prompt longer than :meth:`prompt_limit` tokens."""
        limit = self.prompt_limit(max_new_tokens)
        if limit is None:
            return
        for message in messages:
            length = len(self.tokenizer(message_prompt(self.tokenizer, message), add_special_tokens=False)["input_ids"])
            if length > limit:
                raise RequestError(f"the prompt is {length} tokens; this engine reads at most {limit} "
                                   "(the model's context minus the answer): shorten the question, or use fewer or "
                                   "shorter passages")

    def _defaults(self, mode: str | None, k: int | None, gamma: float | None) -> tuple[str, int, float]:
        """This request's mode, k and gamma (the engine's where None), checked."""
        return (check_mode(self.mode if mode is None else mode), check_k(self.k if k is None else k),
                check_gamma(self.gamma if gamma is None else gamma))

    def answer_batch(self, questions: Sequence[str], *, mode: str | None = None, k: int | None = None,
                     gamma: float | None = None, documents: Sequence[Sequence[Hit]] | None = None,
                     use_gradients: bool = True, **generate_kwargs) -> list[Answer]:
        """Answer many questions; each uses its own documents, all generate in batches.

        Args:
            questions: The questions.
            mode: ``"parametric"`` (gradients only) or ``"hybrid"`` (gradients + passages).
            k: Documents per question (when retrieving).
            gamma: Test-time step scale.
            documents: Documents per question (skips retrieval), e.g. from another retriever.
            use_gradients: False runs the meta-learned phi without any document update.

        Returns:
            One :class:`Answer` per question, in order.

        Raises:
            RequestError: Not a list of non-empty questions, k not a positive int, unknown
                mode, gamma not finite or out of range, missing gradient.
        """
        mode, k, gamma = self._defaults(mode, k, gamma)
        questions = check_texts(questions)
        max_new, retrieving = generate_kwargs.get("max_new_tokens"), documents is None
        if retrieving:
            self.check_prompts([user_message(q) for q in questions], max_new)  # a too long question fails fast
            documents = self.retrieve(questions, k)
        elif len(documents) != len(questions):
            raise RequestError(f"got {len(documents)} document lists for {len(questions)} questions")
        documents = [list(d) for d in documents]
        messages = [user_message(q, [h.text for h in d] if mode == "hybrid" else None) for q, d in zip(questions, documents)]
        if mode == "hybrid" or not retrieving:  # (parametric prompts were the ones checked above)
            self.check_prompts(messages, max_new)  # every prompt, before any generation
        answers: list[Answer] = []
        for start in range(0, len(questions), self.batch_size):
            docs = documents[start:start + self.batch_size]
            factors = self.adapted_factors(docs, gamma) if use_gradients else self.phi
            texts = self.generate_messages(messages[start:start + self.batch_size], factors, **generate_kwargs)
            batch_questions = questions[start:start + self.batch_size]
            answers += [Answer(q, t, mode, d, gamma) for q, t, d in zip(batch_questions, texts, docs)]
        return answers

    def complete_batch(self, messages: Sequence[str], documents: Sequence[Sequence[Hit]], *,
                       gamma: float | None = None, use_gradients: bool = True,
                       **generate_kwargs) -> list[str]:
        """Generate from ready user messages (e.g. a framework's rendered prompt), each with
        the gradients of its own documents; the passages are only in the prompt if the
        caller put them there. Used by the LangChain / LlamaIndex adapters."""
        gamma = check_gamma(self.gamma if gamma is None else gamma)
        messages = check_texts(messages, "prompt")
        if len(documents) != len(messages):
            raise RequestError(f"got {len(documents)} document lists for {len(messages)} prompts")
        self.check_prompts(messages, generate_kwargs.get("max_new_tokens"))
        texts: list[str] = []
        for start in range(0, len(messages), self.batch_size):
            docs = [list(d) for d in documents[start:start + self.batch_size]]
            factors = self.adapted_factors(docs, gamma) if use_gradients else None
            texts += self.generate_messages(messages[start:start + self.batch_size], factors, **generate_kwargs)
        return texts

    def answer(self, question: str, **kwargs) -> Answer:
        """Answer one question (see :meth:`answer_batch` for the arguments)."""
        documents = kwargs.pop("documents", None)
        return self.answer_batch([question], documents=[documents] if documents is not None else None, **kwargs)[0]

    def stream(self, question: str, *, mode: str | None = None, k: int | None = None, gamma: float | None = None,
               documents: Sequence[Hit] | None = None, **generate_kwargs) -> Iterator[str]:
        """Yield answer text pieces as they are generated (one request)."""
        mode, k, gamma = self._defaults(mode, k, gamma)
        check_texts([question])
        max_new, retrieving = generate_kwargs.get("max_new_tokens"), documents is None
        if retrieving:
            self.check_prompts([user_message(question)], max_new)  # a too long question fails fast
        docs = list(documents) if documents is not None else self.retrieve([question], k)[0]
        message = user_message(question, [h.text for h in docs] if mode == "hybrid" else None)
        if mode == "hybrid" or not retrieving:
            self.check_prompts([message], max_new)
        yield from self._stream(message, docs, gamma, **generate_kwargs)

    def stream_message(self, message: str, documents: Sequence[Hit], *, gamma: float | None = None,
                       **generate_kwargs) -> Iterator[str]:
        """Stream the answer to a ready user message with its documents' gradients applied."""
        check_texts([message], "prompt")
        self.check_prompts([message], generate_kwargs.get("max_new_tokens"))
        yield from self._stream(message, documents, check_gamma(self.gamma if gamma is None else gamma),
                                **generate_kwargs)

    def _stream(self, message: str, documents: Sequence[Hit], gamma: float, **generate_kwargs) -> Iterator[str]:
        """Generation in a worker thread, pieces yielded here (message and arguments checked)."""
        from transformers import TextIteratorStreamer

        factors = self.adapted_factors([list(documents)], gamma)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.generate_messages([message], factors, streamer=streamer, **generate_kwargs)
            except BaseException as err:  # surfaced in the caller's thread below
                errors.append(err)
                streamer.end()

        # The worker thread runs in a copy of this context (per-request state stays isolated).
        thread = threading.Thread(target=copy_context().run, args=(run,), daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]
