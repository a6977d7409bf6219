import regrad_engine

EXPECTED = [
    "DEFAULT_MODEL", "Answer", "BM25Index", "BankError", "BankMismatchError", "CheckpointError", "Chunk",
    "ConfigError", "CorpusError", "ElasticsearchIndex", "GradientBank", "Hit", "LoadedModel", "LoraSpace", "MetaCheckpoint",
    "MetaExample", "MetaTrainConfig", "MetaTrainer", "ModelLoadError", "ReGrad", "RequestError",
    "RetrievalError", "Retriever", "UnknownDocumentError", "apply_update", "build_store", "chunk_documents",
    "default_lora_config", "document_gradients", "init_step_sizes", "load_model", "open_engine", "read_corpus",
]


def test_public_api_is_pinned():
    assert sorted(regrad_engine.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert hasattr(regrad_engine, name)
