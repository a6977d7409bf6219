"""Prompts and token batches: chat markup always comes from the tokenizer's template.

Two prompt shapes: ``parametric`` (the question alone: knowledge must come from the
gradients) and ``hybrid`` (numbered passages, then the question). Only the user-message
wording below is ours; the chat markup around it is the model's own.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Literal, Union

import torch
from torch import Tensor

Mode = Literal["parametric", "hybrid"]
# A user turn as text, or a whole chat: [{"role": "system" | "user" | "assistant" | "tool", "content": str}].
Conversation = Union[str, Sequence[Mapping[str, str]]]
IGNORE_INDEX = -100  # label of a token that takes no loss (torch's cross-entropy default)

QUESTION_TEMPLATE = "Question: {question}\nAnswer with a short phrase only."
CONTEXT_TEMPLATE = "Context:\n{passages}\n\n"


def user_message(question: str, passages: Sequence[str] | None = None) -> str:
    """The user turn: numbered passages (if any), then the question."""
    text = QUESTION_TEMPLATE.format(question=question.strip())
    if passages:
        numbered = "\n\n".join(f"[{i + 1}] {p.strip()}" for i, p in enumerate(passages))
        text = CONTEXT_TEMPLATE.format(passages=numbered) + text
    return text


def chat_prompt(tokenizer, question: str, passages: Sequence[str] | None = None) -> str:
    """Prompt text ending where the assistant's answer starts."""
    return message_prompt(tokenizer, user_message(question, passages))


def message_prompt(tokenizer, message: Conversation) -> str:
    """A user message (e.g. a framework's rendered prompt) or a whole conversation, wrapped
    in the model's chat template and ending where the assistant's answer starts."""
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template: use an instruction-tuned model "
                         "or set tokenizer.chat_template")
    return tokenizer.apply_chat_template(conversation_turns(message), tokenize=False, add_generation_prompt=True)


def conversation_turns(conversation: Conversation) -> list[dict[str, str]]:
    """The conversation as role/content dicts (a string is one user turn)."""
    if isinstance(conversation, str):
        return [{"role": "user", "content": conversation}]
    return [{"role": turn["role"], "content": turn["content"]} for turn in conversation]


def with_passages(conversation: Conversation, passages: Sequence[str]) -> list[dict[str, str]]:
    """The conversation with numbered passages put before its last user turn's text (the
    hybrid prompt's context block, for chats that did not put the passages in themselves)."""
    turns = conversation_turns(conversation)
    if not passages:
        return turns
    numbered = "\n\n".join(f"[{i + 1}] {p.strip()}" for i, p in enumerate(passages))
    users = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
    at = users[-1] if users else len(turns)
    if not users:
        turns.append({"role": "user", "content": ""})
    turns[at] = {"role": "user", "content": CONTEXT_TEMPLATE.format(passages=numbered) + turns[at]["content"]}
    return turns


def encode_qa(tokenizer, question: str, answer: str, passages: Sequence[str] | None = None,
              max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer turn, and labels on the answer turn only.

    The answer turn is the text the chat template adds after the generation prompt for an
    assistant message (answer plus end-of-turn marker), so the model learns to stop.
    Long prompts are cut from the left (passages first), never the answer.
    """
    prompt = chat_prompt(tokenizer, question, passages)
    messages = [{"role": "user", "content": user_message(question, passages)},
                {"role": "assistant", "content": answer.strip()}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with an answer; "
                         "cannot locate the answer tokens")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):].rstrip(), add_special_tokens=False)["input_ids"]
    if max_length is not None and len(prompt_ids) + len(answer_ids) > max_length:
        prompt_ids = prompt_ids[len(prompt_ids) + len(answer_ids) - max_length:]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)


def pad_batch(sequences: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None,
              pad_id: int, *, left: bool = False) -> dict[str, Tensor]:
    """Pad to a (b, t) batch with attention mask; labels padded with -100."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    lab = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
        if labels is not None:
            lab[row, span] = torch.tensor(labels[row], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = lab
    return batch


def turn_marker_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: eos and every special token the chat template writes
    (end *and* start of a turn). After a LoRA update a small model sometimes opens a new
    turn (``<|im_start|>``) instead of closing its own; generation must stop there too."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    # Special tokens only: some vocabularies (Gemma's) add plain "\n" tokens that templates write too.
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}
    for token in specials:
        if token and token.strip() and token in template and token != getattr(tokenizer, "pad_token", None):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
    return sorted(ids)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_documents(tokenizer, texts: Sequence[str], max_tokens: int = 200) -> dict[str, Tensor]:
    """LM-loss batch for documents: raw text, every token labelled, cut at ``max_tokens``.

    A document starts with the beginning-of-sequence token where the tokenizer puts one before
    text (Llama 3, Gemma: their models expect it first; SmolLM2 has none), not counted in ``max_tokens``.
    """
    if not texts:
        raise ValueError("no documents to encode")
    bos = bos_prefix(tokenizer)
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    for text, seq in zip(texts, seqs):
        if len(seq) < 2:
            raise ValueError(f"document too short for an LM gradient (needs 2+ tokens): {text[:60]!r}")
    seqs = [bos + seq for seq in seqs]
    return pad_batch(seqs, seqs, pad_id(tokenizer))


_BOS_PREFIX: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its answer, once


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer starts encoded text with it, else ``[]`` (asked once
    per tokenizer: documents are encoded on the request path)."""
    if tokenizer not in _BOS_PREFIX:
        bos = tokenizer.bos_token_id
        _BOS_PREFIX[tokenizer] = [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
    return list(_BOS_PREFIX[tokenizer])


def encode_qa_batch(tokenizer, questions: Sequence[str], answers: Sequence[str],
                    passages: Sequence[Sequence[str] | None] | None = None,
                    max_length: int | None = None) -> dict[str, Tensor]:
    """Right-padded QA batch with answer-only labels."""
    pairs = [encode_qa(tokenizer, q, a, passages[i] if passages else None, max_length)
             for i, (q, a) in enumerate(zip(questions, answers))]
    return pad_batch([p[0] for p in pairs], [p[1] for p in pairs], pad_id(tokenizer))


def encode_prompts(tokenizer, questions: Sequence[str],
                   passages: Sequence[Sequence[str] | None] | None = None) -> dict[str, Tensor]:
    """Left-padded generation prompts (batched generation needs left padding)."""
    return encode_messages(tokenizer, [user_message(q, passages[i] if passages else None)
                                       for i, q in enumerate(questions)])


def encode_messages(tokenizer, messages: Sequence[Conversation]) -> dict[str, Tensor]:
    """Left-padded generation prompts from ready user messages or conversations."""
    seqs = [tokenizer(message_prompt(tokenizer, m), add_special_tokens=False)["input_ids"] for m in messages]
    return pad_batch(seqs, None, pad_id(tokenizer), left=True)
