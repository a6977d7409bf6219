"""Reading a corpus from disk and cutting its documents into token-bounded chunks.

A *document* is a dict with a string ``"id"``, a non-empty ``"text"`` and any
other keys (``"title"``, ``"url"``, ...) which are kept as metadata. A *chunk* is
a piece of one document's text that holds at most ``max_tokens`` tokens of the
model's tokenizer; each chunk later gets its own LoRA gradient.

Chunk ids are ``"<doc_id>"`` when the whole document fits in one chunk and
``"<doc_id>#<i>"`` (``i`` from 0) otherwise. Because the ``#<digits>`` suffix is
reserved for chunk indices, document ids must not end with ``#`` followed by
digits; :func:`chunk_documents` rejects such ids so that :func:`chunk_source`
is always exact.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CHUNK_SUFFIX = re.compile(r"#\d+$")
_CORPUS_SUFFIXES = (".jsonl", ".json", ".txt")
_SENTENCE_END = ".!?"


@dataclass(frozen=True)
class Chunk:
    """One token-bounded piece of a source document.

    Attributes:
        id: ``"<doc_id>"`` if the document fits in one chunk, else ``"<doc_id>#<i>"``.
        text: The chunk text, cut out of the original document text.
        source_id: Id of the document the chunk comes from.
        index: Position of the chunk within its source document (from 0).
        metadata: Metadata copied from the source document (e.g. ``title``).
    """

    id: str
    text: str
    source_id: str
    index: int
    metadata: dict = field(default_factory=dict)


class CorpusError(ValueError):
    """A corpus file or document is missing, unreadable or malformed."""


def chunk_source(chunk_id: str) -> str:
    """Return the source document id of a chunk id.

    The last ``#<digits>`` suffix is the chunk index: ``"doc#3"`` -> ``"doc"``,
    ``"a#b#12"`` -> ``"a#b"``, ``"doc"`` -> ``"doc"``.

    Args:
        chunk_id: A chunk id produced by :func:`chunk_documents`.

    Returns:
        The id of the source document.
    """
    return _CHUNK_SUFFIX.sub("", chunk_id)


def _normalize_doc(doc: Any, where: str) -> dict:
    """Validate one document and return ``{"id", "text", **metadata}``.

    Args:
        doc: The raw document (should be a mapping).
        where: Human-readable location used in error messages.

    Raises:
        CorpusError: If the document is not an object or lacks a usable id/text.
    """
    if not isinstance(doc, Mapping):
        raise CorpusError(f"{where}: expected a JSON object with 'id' and 'text', got {type(doc).__name__}")
    doc_id = doc.get("id")
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise CorpusError(f"{where}: missing or empty 'id'; give every document a unique string id")
    if _CHUNK_SUFFIX.search(doc_id):
        raise CorpusError(
            f"{where}: id {doc_id!r} ends with '#<digits>', which is reserved for chunk indices; rename it"
        )
    text = doc.get("text")
    if not isinstance(text, str) or not text.strip():
        raise CorpusError(f"{where} (id {doc_id!r}): missing or empty 'text'; every document needs a non-empty string 'text'")
    out = {k: v for k, v in doc.items() if k not in ("id", "text", "metadata")}
    if isinstance(doc.get("metadata"), Mapping):
        out.update(doc["metadata"])
    elif "metadata" in doc:
        out["metadata"] = doc["metadata"]
    return {"id": doc_id, "text": text, **out}


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


def _chunk_texts(text: str, tokenizer: Any, max_tokens: int, overlap: int) -> list[str]:
    """Cut ``text`` into pieces that each re-tokenize to at most ``max_tokens`` tokens."""
    offsets = _offsets(tokenizer, text)
    if len(offsets) <= max_tokens:
        return [text]
    pieces = []
    start, n = 0, len(offsets)
    while start < n:
        end = _window_end(text, offsets, start, max_tokens)
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
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be >= 0 and < max_tokens ({max_tokens}), got {overlap}")
    chunks: list[Chunk] = []
    seen_docs: set[str] = set()
    seen_chunks: set[str] = set()
    for n, raw in enumerate(docs):
        doc = _normalize_doc(raw, f"document #{n}")
        doc_id = doc.pop("id")
        text = doc.pop("text")
        if doc_id in seen_docs:
            raise CorpusError(f"document #{n}: duplicate id {doc_id!r}; document ids must be unique")
        seen_docs.add(doc_id)
        pieces = _chunk_texts(text, tokenizer, max_tokens, overlap)
        for i, piece in enumerate(pieces):
            cid = doc_id if len(pieces) == 1 else f"{doc_id}#{i}"
            if cid in seen_chunks:
                raise CorpusError(f"document #{n}: chunk id {cid!r} collides with another document's id; rename one")
            seen_chunks.add(cid)
            chunks.append(Chunk(id=cid, text=piece, source_id=doc_id, index=i, metadata=dict(doc)))
    return chunks


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from exc
    except OSError as exc:
        raise CorpusError(f"cannot read corpus file {path}: {exc.strerror or exc}") from exc


def _read_file(path: Path, txt_id: str) -> list[tuple[dict, str]]:
    """Read one corpus file into ``(document, location)`` pairs."""
    suffix = path.suffix.lower()
    if suffix not in _CORPUS_SUFFIXES:
        raise CorpusError(f"{path}: unsupported corpus file type {suffix!r}; use .jsonl, .json or .txt")
    content = _read_text(path)
    if suffix == ".txt":
        return [(_normalize_doc({"id": txt_id, "text": content}, str(path)), str(path))]
    if suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(
                    f"{where}: invalid JSON on line {lineno} ({exc.msg}); each line must be one JSON object "
                    'like {"id": "doc1", "text": "..."}'
                ) from exc
            out.append((_normalize_doc(obj, where), where))
        return out
    try:
        items = json.loads(content)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from exc
    if not isinstance(items, list):
        raise CorpusError(f'{path}: expected a JSON list of objects like [{{"id": "doc1", "text": "..."}}]')
    return [(_normalize_doc(obj, f"{path} item {i}"), f"{path} item {i}") for i, obj in enumerate(items)]


def read_corpus(path: str | Path) -> list[dict]:
    """Read documents from a corpus file or directory.

    Supported inputs:

    * ``.jsonl``: one JSON object per line with ``id``, ``text`` and optional
      ``title``/other keys (blank lines are skipped);
    * ``.json``: a list of such objects;
    * ``.txt``: the whole file is one document whose id is the file stem;
    * a directory: every ``.txt``/``.jsonl``/``.json`` file inside it
      (recursively, hidden files skipped, sorted by relative path); ``.txt`` ids
      are the relative path without suffix (e.g. ``"guides/setup"``).

    Args:
        path: A corpus file or directory.

    Returns:
        Documents as dicts with ``"id"``, ``"text"`` and any other keys.

    Raises:
        CorpusError: If the path is missing or unreadable, JSON is invalid (the
            message names the file and line), a document lacks ``id``/``text``,
            or two documents share an id.
    """
    root = Path(path)
    if not root.exists():
        raise CorpusError(f"corpus not found: {root}; pass a .jsonl, .json or .txt file or a directory of them")
    if root.is_dir():
        files = sorted(
            (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _CORPUS_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not files:
            raise CorpusError(f"no .jsonl, .json or .txt files in corpus directory {root}")
        entries = [e for f in files for e in _read_file(f, f.relative_to(root).with_suffix("").as_posix())]
    else:
        entries = _read_file(root, root.stem)
    docs: list[dict] = []
    where_by_id: dict[str, str] = {}
    for doc, where in entries:
        if doc["id"] in where_by_id:
            raise CorpusError(
                f"{where}: duplicate id {doc['id']!r} (first seen at {where_by_id[doc['id']]}); ids must be unique"
            )
        where_by_id[doc["id"]] = where
        docs.append(doc)
    if not docs:
        raise CorpusError(f"corpus {root} contains no documents")
    return docs
