"""Every error a user can cause and fix, and the one check of a request's arguments.

This module imports nothing of the package: it is the bottom of the import graph. Every
user error is a :class:`RegradError`; the CLI prints its message (never a traceback), and
an application can catch the base class alone. Each class also keeps the builtin base it
had before (``ValueError``, ``KeyError``, ``RuntimeError``) so existing handlers still work.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any


class RegradError(Exception):
    """Base of every error a user can cause and fix; the message says what to do."""


class RequestError(RegradError, ValueError):
    """A bad request: empty question, k not a positive int, unknown mode, bad gamma."""


class ConfigError(RegradError, ValueError):
    """A config file or flag value is invalid; the message says which and why."""


class DataError(RegradError, ValueError):
    """A data or corpus file is missing, unreadable or malformed; the message says what to fix."""


CorpusError = DataError  # the corpus reader's name for it; one class


class DatasetError(DataError):
    """A raw dataset under ``../shared/data`` is missing or not in the expected layout."""


class RetrievalError(RegradError, ValueError):
    """An index is missing, corrupt or cannot be created or reached, or a document is invalid."""


class BankError(RegradError):
    """A Gradient Bank is missing, damaged or used wrongly."""


class BankMismatchError(BankError):
    """A bank bound to a different base model / meta checkpoint / chunk size."""


class InvalidInputError(BankError, ValueError):
    """An invalid argument to a bank (bad id, dtype string, shapes...)."""


class UnknownDocumentError(BankError, KeyError):
    """A document id that is not in the bank."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BankCorruptError(BankError):
    """A bank file is damaged (checksum, size, ids or values): the message names the file and the repair."""


class BankLockedError(BankError):
    """Another writer holds the bank: the message names it (pid, host, since when)."""


class StoreError(BankError):
    """A store directory (bank + index + ``regrad.json``) is missing or malformed."""


class CheckpointError(RegradError, ValueError):
    """A meta checkpoint is missing, malformed or made for another model."""


class ModelLoadError(RegradError, RuntimeError):
    """A model cannot be found, fetched or loaded."""


MODES: tuple[str, ...] = ("parametric", "hybrid")
MAX_GAMMA = 1e3  # a test-time step scale beyond this only ever yields garbage


CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_mode(mode: Any, allowed: tuple[str, ...] = MODES) -> str:
    """``mode`` itself if it is one of ``allowed`` (``"parametric"`` or ``"hybrid"``)."""
    if not isinstance(mode, str) or mode not in allowed:
        raise RequestError(f"mode must be {' or '.join(repr(m) for m in allowed)}, got {mode!r}")
    return mode


def check_k(k: Any, name: str = "k") -> int:
    """``k`` as an int if it is a positive integer (not a bool, float or string)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise RequestError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def check_gamma(gamma: Any) -> float:
    """``gamma`` as a float if it is a finite number in [0, MAX_GAMMA]."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise RequestError(f"gamma must be a number, got {gamma!r}")
    if not math.isfinite(gamma) or not 0 <= gamma <= MAX_GAMMA:
        raise RequestError(f"gamma must be finite and between 0 and {MAX_GAMMA:g}, got {gamma!r}")
    return float(gamma)


def check_texts(texts: Any, what: str = "question") -> list[str]:
    """``texts`` as a list if it is a sequence (not a string) of non-blank strings."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise RequestError(f"pass a list of {what}s, not {type(texts).__name__} (e.g. [{what!r}])")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise RequestError(f"the {what} is empty: ask something" if isinstance(text, str)
                               else f"every {what} must be a string, got {type(text).__name__}")
    return list(texts)


def check_conversations(conversations: Any, what: str = "prompt") -> list:
    """``conversations`` as a list: each a non-blank string (one user turn) or a non-empty
    list of ``{"role": ..., "content": str}`` turns with a known role, not all blank."""
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise RequestError(f"pass a list of {what}s, not {type(conversations).__name__} (e.g. [{what!r}])")
    for conversation in conversations:
        if isinstance(conversation, str):
            check_texts([conversation], what)
            continue
        if isinstance(conversation, bytes) or not isinstance(conversation, Sequence) or not conversation:
            raise RequestError(f"every {what} must be a string or a non-empty list of chat turns "
                               f"({{'role': 'user', 'content': '...'}}), got {type(conversation).__name__}")
        for turn in conversation:
            if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str):
                raise RequestError(f"a chat turn must be a mapping with a string 'content', got {turn!r:.80}")
            if turn.get("role") not in CHAT_ROLES:
                raise RequestError(f"a chat turn's role must be one of {', '.join(CHAT_ROLES)}, got {turn.get('role')!r}")
        if not any(turn["content"].strip() for turn in conversation):
            raise RequestError(f"the {what} is empty: every turn is blank")
    return list(conversations)


def check_request(questions: Any, *, mode: Any = "parametric", k: Any = 1, gamma: Any = 1.0,
                  what: str = "question") -> list[str]:
    """The one check of a request's arguments (engine, CLI, retrievers, adapters)."""
    check_mode(mode)
    check_k(k)
    check_gamma(gamma)
    return check_texts(questions, what)
