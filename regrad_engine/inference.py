"""Stage 3: retrieve -> fetch -> sum -> phi' -> generate -> keep nothing.

Every request gets its own adapted factors phi' = phi - gamma * alpha (.) sum_j g(d_j),
passed to the model as per-sample LoRA inputs (see ``lora.LoraSpace``); nothing shared is
written, so requests can run concurrently and batched, each with its own documents.
"""

from __future__ import annotations

import functools
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
    check_conversations,
    check_gamma,
    check_k,
    check_mode,
    check_request,
    check_texts,
)
from regrad_engine.gradients import document_gradients
from regrad_engine.lora import LoraSpace, Phi, apply_update
from regrad_engine.prompts import (
    Conversation,
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


@dataclass(frozen=True)
class Completion:
    """Generated text of one prompt, with its token counts.

    ``finish_reason`` is ``"stop"`` when the answer ended at a turn marker or eos, and
    ``"length"`` when it reached its ``max_new_tokens``.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class TextStream(Iterator[str]):
    """Answer pieces of one request as they are generated. Once they are exhausted (or the
    stream is closed), ``completion`` holds the text and its token counts (None until then)."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces = pieces
        self.completion: Completion | None = None
        self.cancelled = threading.Event()  # set by close(): generation stops at its next step

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop reading: generation stops at its next step."""
        self.cancelled.set()
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


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
        self.store_dir: str | None = None  # the store this engine was opened from (set by Store.engine)

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
            try:
                encoded = encode_documents(self.tokenizer, [h.text for h in chunk], self.doc_max_tokens)
            except ValueError as err:  # a blank or one-token document: the caller's to fix
                raise RequestError(f"{err}: remove it from the documents or the corpus") from err
            docs = {k: v.to(self.device) for k, v in encoded.items()}
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

    def adapted_factors(self, hits_lists: Sequence[Sequence[Hit]], gamma: float | Sequence[float]) -> Phi:
        """phi' per request: (b, *shape). ``gamma`` is one step scale, or one per request."""
        sums = self.gradient_sums(hits_lists)
        if isinstance(gamma, (int, float)):
            return apply_update(self.phi, sums, self.alpha, gamma)
        if len(gamma) != len(hits_lists):
            raise RequestError(f"got {len(gamma)} gammas for {len(hits_lists)} requests")
        scale = torch.tensor([check_gamma(g) for g in gamma], dtype=torch.float32, device=self.device)
        sums = {k: v * scale.view(-1, *([1] * (v.dim() - 1))).to(v.dtype) for k, v in sums.items()}
        return apply_update(self.phi, sums, self.alpha, 1.0)

    # ------------------------------------------------------------ generation
    def generate(self, questions: Sequence[str], passages: Sequence[Sequence[str] | None] | None,
                 factors: Mapping[str, Tensor] | None, **generate_kwargs) -> list[str]:
        """Greedy, left-padded batched generation with per-sample factors (or none)."""
        messages = [user_message(q, passages[i] if passages else None) for i, q in enumerate(questions)]
        return self.generate_messages(messages, factors, **generate_kwargs)

    def generate_messages(self, messages: Sequence[Conversation], factors: Mapping[str, Tensor] | None, *,
                          max_new_tokens: int | None = None, **generate_kwargs) -> list[str]:
        """Generate from ready user messages or conversations (wrapped in the chat template), batched."""
        return [c.text for c in self._generate(messages, factors, max_new_tokens=max_new_tokens, **generate_kwargs)]

    def _generate(self, messages: Sequence[Conversation], factors: Mapping[str, Tensor] | None, *,
                  max_new_tokens: int | Sequence[int] | None = None, **generate_kwargs) -> list[Completion]:
        """Greedy, left-padded batched generation; ``max_new_tokens`` may differ per row (the
        batch runs to the longest and each row is cut at its own, as it would end alone)."""
        limits = self._limits(max_new_tokens, len(messages))
        generate_kwargs = check_generate_options(generate_kwargs)
        batch = {k: v.to(self.device) for k, v in encode_messages(self.tokenizer, messages).items()}
        with self.space.activate(factors), torch.no_grad():
            output = self.model.generate(**batch, max_new_tokens=max(limits), do_sample=False, temperature=None,
                                         top_p=None, top_k=None, pad_token_id=pad_id(self.tokenizer),
                                         eos_token_id=self._stop_ids, **generate_kwargs)
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()  # (b, generated)
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        stops = set(self._stop_ids)
        completions = []
        for row, limit in enumerate(limits):
            tokens = new_tokens[row][:limit]
            end = next((i for i, t in enumerate(tokens) if t in stops), None)
            kept = tokens if end is None else tokens[:end + 1]  # the stop token was generated: it counts
            completions.append(Completion(self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                                          int(prompt_tokens[row]), len(kept), "length" if end is None else "stop"))
        return completions

    def _limits(self, max_new_tokens: int | Sequence[int] | None, rows: int) -> list[int]:
        if max_new_tokens is None:
            return [self.max_new_tokens] * rows
        if isinstance(max_new_tokens, Sequence):
            if len(max_new_tokens) != rows:
                raise RequestError(f"got {len(max_new_tokens)} max_new_tokens for {rows} prompts")
            return [check_k(n, "max_new_tokens") for n in max_new_tokens]
        return [check_k(max_new_tokens, "max_new_tokens")] * rows

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

    def count_tokens(self, message: Conversation) -> int:
        """Tokens of the prompt the model reads for this user message or conversation."""
        return len(self.tokenizer(message_prompt(self.tokenizer, message), add_special_tokens=False)["input_ids"])

    def check_prompts(self, messages: Sequence[Conversation],
                      max_new_tokens: int | Sequence[int] | None = None) -> None:
        """Refuse, before any work, a prompt longer than :meth:`prompt_limit` tokens."""
        answers = ([None] * len(messages) if max_new_tokens is None or not isinstance(max_new_tokens, Sequence)
                   else max_new_tokens)
        for message, answer in zip(messages, answers):
            limit = self.prompt_limit(max_new_tokens if not isinstance(max_new_tokens, Sequence) else answer)
            if limit is None:
                return
            if limit < 1:
                raise RequestError(f"an answer of {answer or max_new_tokens} tokens leaves no room for a prompt: this "
                                   f"model reads {self._context} tokens in all; ask for at most "
                                   f"{self._context - 1} new tokens")
            length = self.count_tokens(message)
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

    def complete_batch(self, messages: Sequence[Conversation], documents: Sequence[Sequence[Hit]], *,
                       gamma: float | None = None, use_gradients: bool = True,
                       **generate_kwargs) -> list[str]:
        """Generate from ready user messages (e.g. a framework's rendered prompt), each with
        the gradients of its own documents; the passages are only in the prompt if the
        caller put them there. Used by the LangChain / LlamaIndex adapters."""
        return [c.text for c in self.complete(messages, documents, gamma=gamma, use_gradients=use_gradients,
                                              **generate_kwargs)]

    def complete(self, messages: Sequence[Conversation], documents: Sequence[Sequence[Hit]], *,
                 gamma: float | Sequence[float] | None = None, use_gradients: bool = True,
                 max_new_tokens: int | Sequence[int] | None = None, **generate_kwargs) -> list[Completion]:
        """:meth:`complete_batch` with token counts, and ``gamma`` and ``max_new_tokens`` per
        prompt if wanted: prompts with different settings still generate in one batch.

        Args:
            messages: User messages, or conversations as ``[{"role", "content"}]`` lists
                (roles: system, user, assistant, tool), rendered with the chat template.
            documents: The documents whose gradients each prompt gets (may be empty).
            gamma: Test-time step scale: one, or one per prompt (default: the engine's).
            use_gradients: False runs the meta-learned phi without document updates.
            max_new_tokens: Answer length: one, or one per prompt (default: the engine's).

        Raises:
            RequestError: Bad prompts, lengths or gammas, a prompt too long for the model,
                a missing gradient with ``on_the_fly`` off.
        """
        messages = check_conversations(messages)
        if len(documents) != len(messages):
            raise RequestError(f"got {len(documents)} document lists for {len(messages)} prompts")
        if gamma is None or isinstance(gamma, (int, float)):
            gammas: float | list[float] = check_gamma(self.gamma if gamma is None else gamma)
        else:
            gammas = [check_gamma(g) for g in gamma]
            if len(gammas) != len(messages):
                raise RequestError(f"got {len(gammas)} gammas for {len(messages)} prompts")
        limits = self._limits(max_new_tokens, len(messages))
        self.check_prompts(messages, limits)
        out: list[Completion] = []
        for start in range(0, len(messages), self.batch_size):
            rows = slice(start, start + self.batch_size)
            docs = [list(d) for d in documents[rows]]
            factors = (self.adapted_factors(docs, gammas if isinstance(gammas, float) else gammas[rows])
                       if use_gradients else self.phi)
            out += self._generate(messages[rows], factors, max_new_tokens=limits[rows], **generate_kwargs)
        return out

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

    def stream_message(self, message: Conversation, documents: Sequence[Hit], *, gamma: float | None = None,
                       **generate_kwargs) -> TextStream:
        """Stream the answer to a ready user message or conversation with its documents'
        gradients applied. Checked now; generation starts at the first read."""
        check_conversations([message])
        self.check_prompts([message], generate_kwargs.get("max_new_tokens"))
        stream = TextStream(iter(()))
        stream._pieces = self._stream(message, documents, check_gamma(self.gamma if gamma is None else gamma),
                                      stream, **generate_kwargs)
        return stream

    def _stream(self, message: Conversation, documents: Sequence[Hit], gamma: float, into: TextStream | None = None,
                **generate_kwargs) -> Iterator[str]:
        """Generation in a worker thread, pieces yielded here (message and arguments checked);
        ``into.completion`` gets the text and counts at the end."""
        factors = self.adapted_factors([list(documents)], gamma)
        streamer_class, cancel_class, criteria_list = _streaming_classes()
        streamer = streamer_class(self.tokenizer, set(self._stop_ids))
        if into is not None:  # a closed stream stops generating, not only yielding
            generate_kwargs["stopping_criteria"] = criteria_list([*generate_kwargs.get("stopping_criteria", ()),
                                                                  cancel_class(into.cancelled)])
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
        text, finished = "", False
        try:
            for piece in streamer:
                text += piece
                yield piece
            finished = True
        finally:
            if not finished and into is not None:  # closed early: what was generated so far
                into.completion = Completion(text.strip(), self.count_tokens(message), streamer.generated, "stop")
        thread.join()
        if errors:
            raise errors[0]
        if into is not None:
            into.completion = Completion(text.strip(), self.count_tokens(message), streamer.generated,
                                         "stop" if streamer.stopped else "length")


_SAMPLING = {"do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "num_beams", "num_return_sequences",
             "num_beam_groups", "penalty_alpha", "epsilon_cutoff", "eta_cutoff"}
_FIXED = {"pad_token_id", "eos_token_id", "max_new_tokens", "input_ids", "attention_mask"}


def check_generate_options(options: Mapping[str, object]) -> dict[str, object]:
    """The options for ``model.generate``, less those that only restate greedy decoding;
    a clear error for what the engine cannot honour: sampling (decoding is greedy), options
    it sets itself, and names ``model.generate`` does not know."""
    kept = {}
    for name, value in options.items():
        if (name == "temperature" and value in (None, 0, 0.0)) or (name == "do_sample" and value is False):
            continue
        if name in _SAMPLING:
            raise RequestError(f"{name}={value!r} is not supported: decoding is greedy (one answer per prompt)")
        if name in _FIXED:
            raise RequestError(f"{name} is set by the engine: leave it out")
        if name not in _GENERATE_ARGS and name not in _generation_config_fields():
            raise RequestError(f"unknown generation option {name!r}: pass options of transformers' "
                               "model.generate (e.g. stopping_criteria, logits_processor, repetition_penalty)")
        kept[name] = value
    return kept


@functools.cache
def _generation_config_fields() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(vars(GenerationConfig()))


_GENERATE_ARGS = {"logits_processor", "stopping_criteria", "streamer", "prefix_allowed_tokens_fn", "synced_gpus",
                  "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask", "use_model_defaults",
                  "custom_generate"}


@functools.cache
def _streaming_classes() -> tuple[type, type, type]:
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer  # on first use

    class CountingStreamer(TextIteratorStreamer):
        """Text pieces as generated (prompt and special tokens skipped), counting the tokens."""

        def __init__(self, tokenizer, stop_ids: set[int]) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.stop_ids, self.generated, self.stopped = stop_ids, 0, False

        def put(self, value: Tensor) -> None:
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.generated += value.numel()
                self.stopped = self.stopped or any(int(t) in self.stop_ids for t in value.reshape(-1).tolist())
            super().put(value)

    class Cancelled(StoppingCriteria):
        """Every row stops once ``event`` is set."""

        def __init__(self, event: threading.Event) -> None:
            self.event = event

        def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

    return CountingStreamer, Cancelled, StoppingCriteriaList
