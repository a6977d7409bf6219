"""regrad engine: ReGrad (Retrievable Gradients) meta-learning, Gradient Bank, retrieval and
temporary per-request adaptation. Importing it has no side effects.

The entry points (the modules below hold the rest; see the README's "How it works"):

* serve: :func:`open_engine` -> :class:`ReGrad` (``answer``, ``answer_batch``, ``stream``) -> :class:`Answer`;
* build: :func:`read_corpus`, :func:`chunk_documents`, :func:`build_store`, :class:`Store`;
* retrieve: :class:`BM25Index`, :class:`ElasticsearchIndex` (both :class:`DocumentIndex`), :class:`Hit`,
  or any :class:`Retriever`;
* meta-train: :class:`MetaTrainer` with a :class:`MetaTrainConfig` on :class:`MetaExample` tasks
  (:func:`meta_examples` reads them) -> :class:`MetaCheckpoint`;
* models: :func:`load_model` (``DEFAULT_MODEL`` is the embedded SmolLM2-135M-Instruct);
* errors: every user error is a :class:`RegradError`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOME = {  # name -> module: loaded on first use, so `import regrad_engine.inference` stays light
    "open_engine": "store", "ReGrad": "inference", "Answer": "inference",
    "read_corpus": "data", "chunk_documents": "chunking", "Chunk": "data", "build_store": "store", "Store": "store",
    "BM25Index": "retrieval", "ElasticsearchIndex": "retrieval", "DocumentIndex": "retrieval", "Retriever": "retrieval",
    "Hit": "retrieval",
    "MetaTrainer": "meta", "MetaTrainConfig": "config", "MetaExample": "data", "meta_examples": "data",
    "MetaCheckpoint": "checkpoint",
    "load_model": "models", "LoadedModel": "models", "DEFAULT_MODEL": "models",
    **dict.fromkeys(["RegradError", "RequestError", "ConfigError", "DataError", "RetrievalError", "BankError",
                     "BankCorruptError", "BankLockedError", "StoreError", "CheckpointError", "ModelLoadError"], "errors"),
}

if TYPE_CHECKING:
    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.chunking import chunk_documents
    from regrad_engine.config import MetaTrainConfig
    from regrad_engine.data import Chunk, MetaExample, meta_examples, read_corpus
    from regrad_engine.errors import (
        BankCorruptError, BankError, BankLockedError, CheckpointError, ConfigError, DataError, ModelLoadError,
        RegradError, RequestError, RetrievalError, StoreError,
    )
    from regrad_engine.inference import Answer, ReGrad
    from regrad_engine.meta import MetaTrainer
    from regrad_engine.models import DEFAULT_MODEL, LoadedModel, load_model
    from regrad_engine.retrieval import BM25Index, DocumentIndex, ElasticsearchIndex, Hit, Retriever
    from regrad_engine.store import Store, build_store, open_engine


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'regrad_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"regrad_engine.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    # serve
    "open_engine", "ReGrad", "Answer",
    # build
    "read_corpus", "chunk_documents", "Chunk", "build_store", "Store",
    # retrieve
    "BM25Index", "ElasticsearchIndex", "DocumentIndex", "Retriever", "Hit",
    # meta-train
    "MetaTrainer", "MetaTrainConfig", "MetaExample", "meta_examples", "MetaCheckpoint",
    # models
    "load_model", "LoadedModel", "DEFAULT_MODEL",
    # errors
    "RegradError", "RequestError", "ConfigError", "DataError", "RetrievalError", "BankError", "BankCorruptError",
    "BankLockedError", "StoreError", "CheckpointError", "ModelLoadError",
]
