"""Documents handed from a retriever to the LLM of the same invocation, through its run tree.

Frameworks run a chain as a tree of runs (LangChain: runs with ``parent_run_id``;
LlamaIndex: spans with ``parent_span_id``). A retriever's documents belong to the runs
above it; the LLM call of the same invocation finds them by walking up from its own parent
to the nearest run that holds some (a retrieval that found nothing counts: it holds an
empty list), and no further than the first *boundary* run (LangChain: the chain, i.e. the
``RunnableSequence``, the model is a step of). Two invocations are two trees, so they never
see each other's documents, and two chains run side by side inside one invocation do not
either: nothing is shared by text, and nothing outlives the invocation (a run's entry
goes when the run ends).

Framework-free: the adapters feed it from their callback / span handlers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

class NoDocumentsWarning(UserWarning):
    """A parametric call received no documents: it answers from the meta-learned model alone."""


class OnTheFlyWarning(UserWarning):
    """Most of a query's gradients are not in the bank: each is computed now (slow)."""


DEFAULT_MAX_RUNS = 100_000  # live runs remembered; a run that never reports its end is dropped oldest first


class RunScopes:
    """Thread-safe map: run id -> parent run id, and run id -> documents handed to it.

    Args:
        max_runs: Runs remembered at once (a bound against runs whose end is never reported).
    """

    def __init__(self, max_runs: int = DEFAULT_MAX_RUNS) -> None:
        self.max_runs = max_runs
        self._parents: OrderedDict[Hashable, Hashable | None] = OrderedDict()
        self._documents: dict[Hashable, dict[str, Any]] = {}
        self._boundaries: set[Hashable] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._parents)

    def started(self, run_id: Hashable, parent_id: Hashable | None, *, boundary: bool = False) -> None:
        """A run began under ``parent_id`` (None: a root). A ``boundary`` run is as far up
        as a call below it looks for documents."""
        with self._lock:
            self._parents[run_id] = parent_id
            if boundary:
                self._boundaries.add(run_id)
            while len(self._parents) > self.max_runs:
                oldest, _ = self._parents.popitem(last=False)
                self._documents.pop(oldest, None)
                self._boundaries.discard(oldest)

    def ended(self, run_id: Hashable) -> None:
        """A run finished (or failed): forget it and its documents."""
        with self._lock:
            self._parents.pop(run_id, None)
            self._documents.pop(run_id, None)
            self._boundaries.discard(run_id)

    def add(self, parent_id: Hashable | None, documents: Iterable[Any], key=lambda d: d.id) -> bool:
        """Hand ``documents`` (found by a retriever running under ``parent_id``) to that run
        and every run above it. False if ``parent_id`` is not a known run (nothing kept)."""
        documents = list(documents)
        with self._lock:
            if parent_id is None or parent_id not in self._parents:
                return False
            for run in self._ancestry(parent_id):
                held = self._documents.setdefault(run, {})
                for doc in documents:
                    held.setdefault(key(doc), doc)
            return True

    def find(self, parent_id: Hashable | None) -> list[Any] | None:
        """The documents of the nearest run at or above ``parent_id`` that was handed any
        (possibly none), in the order they were handed over, looking no higher than the
        first boundary run; None if there is none (or the run is unknown)."""
        with self._lock:
            if parent_id is None or parent_id not in self._parents:
                return None
            for run in self._ancestry(parent_id):
                if run in self._documents:
                    return list(self._documents[run].values())
                if run in self._boundaries:
                    return None
            return None

    def known(self, run_id: Hashable | None) -> bool:
        with self._lock:
            return run_id is not None and run_id in self._parents

    def _ancestry(self, run_id: Hashable) -> Sequence[Hashable]:
        chain, seen = [], set()
        while run_id is not None and run_id in self._parents and run_id not in seen:
            seen.add(run_id)
            chain.append(run_id)
            run_id = self._parents[run_id]
        return chain
