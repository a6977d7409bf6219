"""Cutting documents into token-bounded chunks; each chunk later gets its own LoRA gradient.

A *chunk* is a piece of one document's text that holds at most ``max_tokens`` tokens of
the model's tokenizer. The document schema, chunk ids and the corpus reader are in
``data.py`` (re-exported here): chunk ids are ``"<doc_id>"`` when the whole document fits
in one chunk and ``"<doc_id>#<i>"`` (``i`` from 0) otherwise, so :func:`chunk_source` is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from regrad_engine.data import (
    Chunk,
    CorpusError,
    chunk_source,
    normalize_document,
    read_corpus,
)
from regrad_engine.errors import ConfigError

__all__ = ["Chunk", "CorpusError", "chunk_documents", "chunk_source", "read_corpus"]

_SENTENCE_END = ".!?"
MIN_CHUNK_TOKENS = 8  # shorter windows cut text into pieces too small to learn from


def _is_boundary(text: str, offsets: list, e: int) -> tuple[bool, bool]:
    """Tell whether cutting before token ``e`` falls on whitespace / a sentence end.

    Returns:
        ``(whitespace_boundary, sentence_boundary)``.
    """
    prev_end, next_start = offsets[e - 1][1], offsets[e][0]
    gap = text[prev_end:next_start]
    last = text[prev_end - 1] if prev_end > 0 else ""
    first = text[next_start] if next_start < len(text) else ""
    ws = any(c.isspace() for c in gap) or first.isspace() or last.isspace()
    sentence = ws and (last in _SENTENCE_END or "\n" in gap or first == "\n" or last == "\n")
    return ws, sentence


def _window_end(text: str, offsets: list, start: int, max_tokens: int) -> int:
    """Return the end token (exclusive) of the window that starts at ``start``.

    Inside a full window the cut moves back to the last sentence boundary, or
    failing that the last whitespace, if one lies in the last 30% of the window.
    """
    end = min(start + max_tokens, len(offsets))
    if end == len(offsets):
        return end
    lowest = start + max(1, math.ceil(0.7 * max_tokens))
    ws_cut = None
    for e in range(end, lowest - 1, -1):
        ws, sentence = _is_boundary(text, offsets, e)
        if sentence:
            return e
        if ws and ws_cut is None:
            ws_cut = e
    return ws_cut or end


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _offsets(tokenizer: Any, text: str) -> list:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise ValueError(
            "chunk_documents needs a fast tokenizer that returns offset mappings; "
            "load it with AutoTokenizer.from_pretrained(name, use_fast=True)"
        ) from exc
    return [tuple(o) for o in enc["offset_mapping"]]


def _chunk_texts(text: str, offsets: list, tokenizer: Any, max_tokens: int, overlap: int) -> list[str]:
    """Cut ``text`` (its token ``offsets`` given) into pieces that each re-tokenize to at most
    ``max_tokens`` tokens."""
    if len(offsets) <= max_tokens:
        return [text]
    pieces = []
    start, n = 0, len(offsets)
    while start < n:
        end = _window_end(text, offsets, start, max_tokens)
        if 0 < n - end < 2 and end - start > 2:
            end = n - 2  # never leave a one-token tail: a chunk needs 2+ tokens for an LM gradient
        while True:
            piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
            # Tokenizing a substring can differ at its edges; shrink until it fits.
            excess = _count_tokens(tokenizer, piece) - max_tokens
            if excess <= 0 or end - start <= 1:
                break
            end = max(start + 1, end - excess)
        if piece:
            pieces.append(piece)
        if end >= n:
            break
        start = max(end - overlap, start + 1)
    return pieces


def chunk_documents(
    docs: Iterable[dict], tokenizer: Any, max_tokens: int = 200, overlap: int = 0
) -> list[Chunk]:
    """Split documents into chunks of at most ``max_tokens`` tokens.

    Splitting uses the tokenizer's offset mapping, so chunk text is cut out of
    the original string at token boundaries (preferring a sentence end or
    whitespace in the last 30% of a window). Every chunk re-tokenizes (without
    special tokens) to at most ``max_tokens`` tokens. A title is not prepended to
    the text; it stays in ``metadata``.

    Args:
        docs: Dicts with a unique ``"id"`` (string; ints are converted), a
            non-empty ``"text"`` and optional other keys (kept as metadata; a
            nested ``"metadata"`` dict is merged in).
        tokenizer: A Hugging Face *fast* tokenizer (or anything callable the
            same way that returns ``input_ids`` and ``offset_mapping``).
        max_tokens: Maximum tokens per chunk; must be >= 1.
        overlap: Tokens shared by consecutive chunks of one document; must be in
            ``[0, max_tokens)``.

    Returns:
        The chunks of all documents, in document order.

    Raises:
        ValueError: If ``max_tokens``/``overlap`` are out of range or the
            tokenizer cannot return offsets.
        CorpusError: If a document is malformed or ids collide.
    """
    if not isinstance(max_tokens, int) or max_tokens < MIN_CHUNK_TOKENS:
        raise ConfigError(f"max_tokens (--chunk-tokens) must be >= {MIN_CHUNK_TOKENS}, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ConfigError(f"overlap must be >= 0 and < max_tokens ({max_tokens}), got {overlap}")
    chunks: list[Chunk] = []
    too_short: list[tuple[int, str]] = []
    seen_docs: set[str] = set()
    seen_chunks: set[str] = set()
    for n, raw in enumerate(docs):
        doc = normalize_document(raw, f"document #{n}")
        doc_id = doc.pop("id")
        text = doc.pop("text")
        if doc_id in seen_docs:
            raise CorpusError(f"document #{n}: duplicate id {doc_id!r}; document ids must be unique")
        seen_docs.add(doc_id)
        offsets = _offsets(tokenizer, text)
        if len(offsets) < 2:
            too_short.append((n, doc_id))
            continue
        pieces = _chunk_texts(text, offsets, tokenizer, max_tokens, overlap)
        for i, piece in enumerate(pieces):
            cid = doc_id if len(pieces) == 1 else f"{doc_id}#{i}"
            if cid in seen_chunks:
                raise CorpusError(f"document #{n}: chunk id {cid!r} collides with another document's id; rename one")
            seen_chunks.add(cid)
            chunks.append(Chunk(id=cid, text=piece, source_id=doc_id, index=i, metadata=dict(doc)))
    if too_short:
        n, doc_id = too_short[0]
        raise CorpusError(f"document #{n} (id {doc_id!r}) is shorter than 2 tokens: an LM gradient needs more; "
                          f"remove it or give it text ({len(too_short)} such documents)")
    return chunks
