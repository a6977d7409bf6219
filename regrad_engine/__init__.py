"""regrad engine: ReGrad (Retrievable Gradients) meta-learning, Gradient Bank, retrieval and
temporary per-request adaptation. Importing it has no side effects."""

from regrad_engine.bank import BankError, BankMismatchError, GradientBank, UnknownDocumentError
from regrad_engine.checkpoint import CheckpointError, MetaCheckpoint
from regrad_engine.chunking import Chunk, CorpusError, chunk_documents, read_corpus
from regrad_engine.config import ConfigError, MetaTrainConfig
from regrad_engine.elastic import ElasticsearchIndex
from regrad_engine.errors import RequestError
from regrad_engine.gradients import document_gradients
from regrad_engine.inference import Answer, ReGrad
from regrad_engine.lora import LoraSpace, apply_update, default_lora_config, init_step_sizes
from regrad_engine.meta import MetaExample, MetaTrainer
from regrad_engine.models import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model
from regrad_engine.pipeline import build_store, open_engine
from regrad_engine.retrieval import BM25Index, Hit, RetrievalError, Retriever

__all__ = [
    "DEFAULT_MODEL",
    "Answer",
    "BM25Index",
    "BankError",
    "BankMismatchError",
    "CheckpointError",
    "Chunk",
    "ConfigError",
    "CorpusError",
    "ElasticsearchIndex",
    "GradientBank",
    "Hit",
    "LoadedModel",
    "LoraSpace",
    "MetaCheckpoint",
    "MetaExample",
    "MetaTrainConfig",
    "MetaTrainer",
    "ModelLoadError",
    "ReGrad",
    "RequestError",
    "RetrievalError",
    "Retriever",
    "UnknownDocumentError",
    "apply_update",
    "build_store",
    "chunk_documents",
    "default_lora_config",
    "document_gradients",
    "init_step_sizes",
    "load_model",
    "open_engine",
    "read_corpus",
]
