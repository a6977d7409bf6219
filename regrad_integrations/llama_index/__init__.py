"""LlamaIndex adapters for a ReGrad engine: an LLM, a retriever and a query engine.

* :class:`ReGradLLM` is the engine as a LlamaIndex chat LLM. Put it in any pipeline
  (``index.as_query_engine(llm=...)``, ``Settings.llm``, ``RetrieverQueryEngine``, chat
  engines): every call gets the gradients of the nodes its own query retrieved. Those nodes
  reach it through the query's span tree (``_spans``), never from other queries; in
  ``parametric`` mode their text is cut out of the prompt first.
* :class:`ReGradRetriever` returns the engine index's documents, or any LlamaIndex
  retriever's nodes (``base_retriever``) marked with their ids in the bank.
* :class:`ReGradQueryEngine` answers from a retriever's nodes in one engine call, batched
  with ``query_batch``.
* :func:`write_corpus` writes an index's nodes as a ``regrad build`` corpus.

A node's gradient is found in the bank under the ``regrad_id`` a :class:`ReGradRetriever`
gave it, ``id_fn(node)`` if given, its ``ref_doc_id`` (the ``Document.id_``) if the bank
holds it, else its ``node_id``; one missing from the bank is computed on the fly (slow:
``OnTheFlyWarning`` when most of a query's are). Every computation happens in the engine
(:class:`regrad_engine.ReGrad`); these classes only translate between LlamaIndex objects and
the engine's calls.
"""

from __future__ import annotations

try:
    import llama_index.core  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("the LlamaIndex adapters need llama-index-core: pip install 'regrad[llamaindex]'") from err

from regrad_integrations.llama_index._nodes import NoDocumentsWarning, OnTheFlyWarning, write_corpus
from regrad_integrations.llama_index.llm import ReGradLLM
from regrad_integrations.llama_index.query_engine import ReGradQueryEngine
from regrad_integrations.llama_index.retriever import ReGradRetriever

__all__ = ["NoDocumentsWarning", "OnTheFlyWarning", "ReGradLLM", "ReGradQueryEngine", "ReGradRetriever",
           "write_corpus"]
