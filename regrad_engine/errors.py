"""Errors a user can cause and fix; the CLI prints their message instead of a traceback."""

from __future__ import annotations

from regrad_engine.bank import BankError
from regrad_engine.checkpoint import CheckpointError
from regrad_engine.chunking import CorpusError
from regrad_engine.config import ConfigError
from regrad_engine.data import DataError
from regrad_engine.datasets.converters import DatasetError
from regrad_engine.models import ModelLoadError
from regrad_engine.retrieval import RetrievalError


class RequestError(ValueError):
    """A bad request: empty question, k <= 0, unknown mode, unknown document id."""


USER_ERRORS: tuple[type[Exception], ...] = (BankError, CheckpointError, CorpusError, ConfigError, DataError, DatasetError,
                                             ModelLoadError, RetrievalError, RequestError)
