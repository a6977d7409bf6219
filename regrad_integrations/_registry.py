"""Where documents sit in a rendered prompt (framework-free; shared by the adapters).

Two uses:

* :func:`locate` finds the documents a call was *handed* (through the run tree, see
  ``_handoff``, or passed explicitly) in the prompt, so that parametric mode can cut their
  text out. Matching is forgiving: case, runs of whitespace, HTML entities and JSON/Python
  string escapes are normalised away, and a document cut short by ``format_docs`` is
  found by its first ``MIN_PREFIX`` characters or more.
* :class:`DocumentRegistry` is the fallback for prompts built outside a run tree (the
  retriever invoked by hand, its documents pasted into a prompt): texts the adapters'
  retrievers returned *outside* any chain are registered, and a prompt's documents are the
  registered texts it contains (same normalisation, whole texts only).

Lookup cost: registered texts are indexed by their first ``PREFIX_CHARS`` normalised
characters, so :meth:`DocumentRegistry.find` costs O(len(prompt)) dictionary lookups however
many texts are registered. The registry is an LRU bounded at ``max_entries`` texts.
"""

from __future__ import annotations

import html
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from regrad_engine.retrieval.base import Hit

PREFIX_CHARS = 32
MIN_PREFIX = 40  # a document cut short still matches by this many normalised characters
MIN_CHARS = 20  # a shorter document is not looked for: as short a text is as likely the user's own words
DEFAULT_MAX_ENTRIES = 10_000

_ENTITY = re.compile(r"&(#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\", "/": "/", "b": "", "f": ""}
_ELLIPSIS = re.compile(r"\s*(\.\.\.|\u2026)")


def normalize(text: str) -> tuple[str, list[int], list[int]]:
    """``text`` casefolded, with entities and escapes decoded and whitespace runs made one
    space; plus, for each character of the result, where it starts and ends in ``text``."""
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []

    def emit(chars: str, start: int, end: int) -> None:
        for char in chars.casefold():
            if char.isspace():
                if out and out[-1] == " ":  # extend the space already written
                    ends[-1] = end
                    continue
                char = " "
            out.append(char)
            starts.append(start)
            ends.append(end)

    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "&" and (m := _ENTITY.match(text, i)) and (decoded := html.unescape(m.group())) != m.group():
            emit(decoded, i, m.end())
            i = m.end()
        elif char == "\\" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2:i + 6]):
                emit(chr(int(text[i + 2:i + 6], 16)), i, i + 6)
                i += 6
            elif nxt in _ESCAPES:
                emit(_ESCAPES[nxt], i, i + 2)
                i += 2
            else:
                emit(char, i, i + 1)
                i += 1
        else:
            emit(char, i, i + 1)
            i += 1
    return "".join(out), starts, ends


def locate(prompt: str, hits: Sequence[Hit]) -> tuple[list[tuple[int, int, Hit]], list[Hit]]:
    """Where each of ``hits`` sits in ``prompt``: ``(spans, not_found)``.

    A document matches in whole, or by its longest normalised prefix of at least
    ``MIN_PREFIX`` characters (a ``format_docs`` that truncates; a following ``...`` goes
    with it). Spans are in ``prompt``'s own characters, every occurrence, by position."""
    norm, starts, ends = normalize(prompt)
    spans: list[tuple[int, int, Hit]] = []
    missing: list[Hit] = []
    for hit in hits:
        text = normalize(hit.text)[0].strip()
        if len(text) < MIN_CHARS:
            missing.append(hit)
            continue
        found = [m for m in _occurrences(norm, text) if _bounded(norm, m[0], m[0] + m[1])]
        if not found and len(text) > MIN_PREFIX:
            found = [m for m in _longest_prefix(norm, text) if _bounded(norm, m[0], None)]
        if not found:
            missing.append(hit)
            continue
        for start, length in found:
            end = ends[start + length - 1]
            tail = _ELLIPSIS.match(prompt, end) if length < len(text) else None
            begin, end = starts[start], tail.end() if tail else end
            if 0 < begin and end < len(prompt) and prompt[begin - 1] == prompt[end] and prompt[end] in "\"'":
                begin, end = begin - 1, end + 1  # a quoted string (json.dumps, repr): the quotes go too
            spans.append((begin, end, hit))
    return sorted(spans, key=lambda span: span[0]), missing


def _bounded(norm: str, start: int, end: int | None) -> bool:
    """Whether a match starts (and, with ``end``, ends) at a word boundary: never inside a word."""
    def inner(i: int) -> bool:
        return 0 <= i < len(norm) and norm[i].isalnum()

    return not (inner(start - 1) and inner(start)) and (end is None or not (inner(end - 1) and inner(end)))


def _occurrences(norm: str, text: str) -> list[tuple[int, int]]:
    found, start = [], norm.find(text)
    while start != -1:
        found.append((start, len(text)))
        start = norm.find(text, start + len(text))
    return found


def _longest_prefix(norm: str, text: str) -> list[tuple[int, int]]:
    best: list[tuple[int, int]] = []
    start = norm.find(text[:MIN_PREFIX])
    while start != -1:
        length = MIN_PREFIX
        while length < len(text) and start + length < len(norm) and norm[start + length] == text[length]:
            length += 1
        if not best or length > best[0][1]:
            best = [(start, length)]
        elif length == best[0][1]:
            best.append((start, length))
        start = norm.find(text[:MIN_PREFIX], start + 1)
    return best


class DocumentRegistry:
    """Thread-safe bounded LRU: document text -> :class:`Hit`.

    Args:
        max_entries: Texts kept; the least recently registered or found go first.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._hits: OrderedDict[str, Hit] = OrderedDict()
        self._by_prefix: dict[str, set[str]] = {}
        self._short: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._hits)

    def register(self, hits: Iterable[Hit]) -> None:
        """Remember these documents (keyed by their normalised text)."""
        with self._lock:
            for hit in hits:
                text = normalize(hit.text)[0].strip()
                if len(text) < MIN_CHARS:
                    continue
                if text not in self._hits:
                    self._index(text)
                self._hits[text] = hit
                self._hits.move_to_end(text)
            while len(self._hits) > self.max_entries:
                oldest, _ = self._hits.popitem(last=False)
                self._unindex(oldest)

    def find(self, prompt: str) -> list[tuple[int, int, Hit]]:
        """Registered documents in ``prompt``: ``(start, end, hit)`` ordered by position, in
        the prompt's own characters (matching is on normalised text).

        Overlapping matches go to the longest text; each document is reported once (its
        first occurrence).
        """
        norm, starts, ends = normalize(prompt)
        found: list[tuple[int, int, str]] = []
        with self._lock:
            for start in range(len(norm) - PREFIX_CHARS + 1):
                for text in self._by_prefix.get(norm[start:start + PREFIX_CHARS], ()):
                    if norm.startswith(text, start) and _bounded(norm, start, start + len(text)):
                        found.append((start, start + len(text), text))
            for text in self._short:
                start = norm.find(text)
                while start != -1:
                    if _bounded(norm, start, start + len(text)):
                        found.append((start, start + len(text), text))
                    start = norm.find(text, start + 1)
            hits = {text: self._hits[text] for _, _, text in found}
            for text in hits:
                self._hits.move_to_end(text)
        claimed: list[tuple[int, int, Hit]] = []  # repeated copies claim their text too
        for start, end, text in sorted(found, key=lambda m: (m[0] - m[1], m[0])):  # longest first
            if not any(start < e and s < end for s, e, _ in claimed):
                claimed.append((start, end, hits[text]))
        chosen: list[tuple[int, int, Hit]] = []
        seen: set[str] = set()
        for start, end, hit in sorted(claimed, key=lambda m: m[0]):
            if hit.id not in seen:
                seen.add(hit.id)
                chosen.append((starts[start], ends[end - 1], hit))
        return chosen

    @staticmethod
    def strip(prompt: str, spans: Sequence[tuple[int, int, Hit]]) -> str:
        """``prompt`` without these documents' texts (every occurrence), and without the
        blank lines they leave behind: the whitespace around a removed text collapses to
        the widest separator it had (blank line, line break or space)."""
        if not spans:
            return prompt
        ranges = [(start, end) for start, end, _ in spans]
        for text in {prompt[start:end] for start, end in ranges}:  # repeated copies as well
            start = prompt.find(text)
            while start != -1:
                if _bounded(prompt, start, start + len(text)):
                    ranges.append((start, start + len(text)))
                start = prompt.find(text, start + len(text))
        pieces, pos = [], 0
        for start, end in sorted(ranges):
            if start >= pos:
                pieces.append(prompt[pos:start])
            pos = max(pos, end)
        pieces.append(prompt[pos:])
        out = pieces[0]
        for piece in pieces[1:]:
            left, right = out.rstrip(), piece.lstrip()
            gap = out[len(left):] + piece[:len(piece) - len(right)]
            if not left or not right:  # keep the whitespace for the next join (or the final strip)
                out = left + gap + right if left else right if right else gap
                continue
            newlines = gap.count("\n")
            sep = "\n\n" if newlines >= 2 else "\n" if newlines else " " if gap else ""
            out = left + sep + right
        return out.strip()

    def _index(self, text: str) -> None:
        if len(text) < PREFIX_CHARS:
            self._short.add(text)
        else:
            self._by_prefix.setdefault(text[:PREFIX_CHARS], set()).add(text)

    def _unindex(self, text: str) -> None:
        if len(text) < PREFIX_CHARS:
            self._short.discard(text)
            return
        bucket = self._by_prefix.get(text[:PREFIX_CHARS])
        if bucket is not None:
            bucket.discard(text)
            if not bucket:
                del self._by_prefix[text[:PREFIX_CHARS]]


_registries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_registries_lock = threading.Lock()


def registry_for(engine: object) -> DocumentRegistry:
    """The fallback registry of the adapter objects over this engine (freed with the engine)."""
    with _registries_lock:
        registry = _registries.get(engine)
        if registry is None:
            registry = _registries[engine] = DocumentRegistry()
        return registry


def prompt_documents(engine: object, prompt: str, mode: str,
                     handed: Sequence[Hit] | None = None) -> tuple[str, list[Hit], list[Hit]]:
    """What the model reads for a rendered prompt, the documents whose gradients it gets,
    and those of them whose text could not be found in the prompt.

    ``handed``: the call's documents (run tree or explicit); None falls back to the
    registered documents the prompt contains. In ``parametric`` mode the documents' text is
    cut out of the prompt."""
    if handed is None:
        spans, missing = registry_for(engine).find(prompt), []
        hits = [hit for _, _, hit in spans]
    else:
        spans, missing = locate(prompt, handed)
        hits = list(handed)
    message = DocumentRegistry.strip(prompt, spans) if mode == "parametric" else prompt
    return message, hits, missing
