"""Which retrieved documents a rendered prompt contains (framework-free; shared by the adapters).

A framework chain hands the LLM only a rendered prompt string. The retriever adapters
register every document they return here; the LLM adapters then look the prompt up: the
registered texts it contains are its documents, so the LLM applies the gradients of exactly
the documents that this invocation's retriever returned, with no second retrieval and no
shared per-request state (parallel invocations cannot mix documents: each prompt carries
its own).

Lookup cost: registered texts are indexed by their first ``PREFIX_CHARS`` characters, and
:meth:`DocumentRegistry.find` looks up each position of the prompt in that index, so a call
costs O(len(prompt)) dictionary lookups however many texts are registered (texts shorter
than ``PREFIX_CHARS`` are rare and checked with ``in``). The registry is an LRU bounded at
``max_entries`` texts: a document only has to survive from retrieval to generation.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from regrad_engine.retrieval.base import Hit

PREFIX_CHARS = 32
DEFAULT_MAX_ENTRIES = 10_000


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
        """Remember these documents (keyed by their text without outer whitespace)."""
        with self._lock:
            for hit in hits:
                text = hit.text.strip()
                if not text:
                    continue
                if text not in self._hits:
                    self._index(text)
                self._hits[text] = hit
                self._hits.move_to_end(text)
            while len(self._hits) > self.max_entries:
                oldest, _ = self._hits.popitem(last=False)
                self._unindex(oldest)

    def find(self, prompt: str) -> list[tuple[int, int, Hit]]:
        """Registered documents in ``prompt``: ``(start, end, hit)`` ordered by position.

        Overlapping matches go to the longest text; each document is reported once (its
        first occurrence).
        """
        found: list[tuple[int, int, str]] = []
        with self._lock:
            for start in range(len(prompt) - PREFIX_CHARS + 1):
                for text in self._by_prefix.get(prompt[start:start + PREFIX_CHARS], ()):
                    if prompt.startswith(text, start):
                        found.append((start, start + len(text), text))
            for text in self._short:
                start = prompt.find(text)
                while start != -1:
                    found.append((start, start + len(text), text))
                    start = prompt.find(text, start + 1)
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
                chosen.append((start, end, hit))
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
    """The registry shared by every adapter object over this engine (freed with the engine)."""
    with _registries_lock:
        registry = _registries.get(engine)
        if registry is None:
            registry = _registries[engine] = DocumentRegistry()
        return registry


def prompt_documents(engine: object, prompt: str, mode: str) -> tuple[str, list[Hit]]:
    """What the model reads for a rendered prompt, and the documents whose gradients it gets:
    the registered documents the prompt contains; in ``parametric`` mode their text is cut out."""
    registry = registry_for(engine)
    found = registry.find(prompt)  # [(start, end, hit)]
    message = registry.strip(prompt, found) if mode == "parametric" else prompt
    return message, [hit for _, _, hit in found]
