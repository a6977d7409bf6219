"""Retrieval: the shared protocol and checks (``base``) and the index backends.

* ``bm25``: the embedded on-disk BM25 index (default; no server);
* ``elasticsearch``: BM25 on an Elasticsearch server (``pip install 'regrad[elasticsearch]'``).

A store finds a backend by the kind its ``regrad.json`` names (see ``base.open_index``).
"""

from regrad_engine.retrieval.base import (
    DocumentIndex,
    Hit,
    RetrievalError,
    Retriever,
    backend,
    check_query,
    open_index,
    records,
    register_backend,
)
from regrad_engine.retrieval.bm25 import BM25Index
from regrad_engine.retrieval.elasticsearch import ElasticsearchIndex

__all__ = ["BM25Index", "DocumentIndex", "ElasticsearchIndex", "Hit", "RetrievalError", "Retriever", "backend",
           "check_query", "open_index", "records", "register_backend"]
