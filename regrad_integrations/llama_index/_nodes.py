"""Nodes and the bank: which id a node's gradient is stored under, and nodes as engine documents.

A node's id in the bank is, in this order: the ``regrad_id`` metadata a ``ReGradRetriever``
puts on it, ``id_fn(node)`` if given, its ``ref_doc_id`` (the LlamaIndex ``Document.id_``)
if the bank holds it, else its ``node_id``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from llama_index.core.schema import BaseNode, NodeWithScore, TextNode

from regrad_engine.retrieval.base import Hit
from regrad_integrations._handoff import NoDocumentsWarning, OnTheFlyWarning  # noqa: F401 (re-exported)

IdFn = Callable[[BaseNode], str]
ID_KEY = "regrad_id"  # metadata a ReGradRetriever puts on foreign nodes: their id in the bank


def hit_to_node(hit: Hit) -> NodeWithScore:
    return NodeWithScore(node=TextNode(id_=hit.id, text=hit.text, metadata=dict(hit.metadata)), score=hit.score)


def bank_id(node: BaseNode | NodeWithScore, engine: Any, id_fn: IdFn | None = None) -> str:
    """The id under which the bank holds this node's gradient (see the module docstring)."""
    node = node.node if isinstance(node, NodeWithScore) else node
    if node.metadata.get(ID_KEY):
        return str(node.metadata[ID_KEY])
    if id_fn is not None and (chosen := id_fn(node)):
        return str(chosen)
    ref = node.ref_doc_id
    if ref and engine.bank is not None and ref in engine.bank:
        return ref
    return node.node_id


def node_hits(nodes: Iterable[NodeWithScore], engine: Any, id_fn: IdFn | None = None) -> list[Hit]:
    """The nodes as engine documents, one per bank id (the first node of an id wins)."""
    hits: dict[str, Hit] = {}
    for node in nodes:
        doc_id = bank_id(node, engine, id_fn)
        if doc_id not in hits:
            metadata = {k: v for k, v in node.node.metadata.items() if k != ID_KEY}
            hits[doc_id] = Hit(id=doc_id, text=node.node.get_content(), score=node.score or 0.0, metadata=metadata)
    return list(hits.values())


def with_bank_id(node: NodeWithScore, doc_id: str) -> NodeWithScore:
    """A copy of a foreign node that carries its bank id (hidden from prompts and embeddings)."""
    inner = node.node
    if inner.metadata.get(ID_KEY) == doc_id:
        return node
    copy = inner.model_copy(update={
        "metadata": {**inner.metadata, ID_KEY: doc_id},
        "excluded_llm_metadata_keys": [*inner.excluded_llm_metadata_keys, ID_KEY],
        "excluded_embed_metadata_keys": [*inner.excluded_embed_metadata_keys, ID_KEY]})
    return NodeWithScore(node=copy, score=node.score)


def warn_if_mostly_on_the_fly(owner: Any, engine: Any, hits: Sequence[Hit]) -> None:
    """Once per ``owner`` (its ``_warned_on_the_fly`` flag): most of a query's gradients
    are not in the bank, so each is computed on the fly."""
    if getattr(owner, "_warned_on_the_fly", True) or not hits or not engine.on_the_fly:
        return
    missing = [h.id for h in hits if engine.bank is None or h.id not in engine.bank]
    if 2 * len(missing) <= len(hits):
        return
    owner._warned_on_the_fly = True
    warnings.warn(
        f"{type(owner).__name__}: {len(missing)} of {len(hits)} documents of this query have no gradient in the "
        f"bank (e.g. id {missing[0]!r}), so each is computed on the fly, which is slow. Build the bank with "
        "`regrad build` from the same documents under the same ids (a LlamaIndex Document's id_ is its nodes' "
        "ref_doc_id; write_corpus(nodes, path) writes an index's nodes as a corpus), or map nodes to bank ids "
        "with id_fn=...", OnTheFlyWarning, stacklevel=3)


def write_corpus(nodes: Iterable[BaseNode | NodeWithScore], path: str | os.PathLike, *,
                 id_fn: IdFn | None = None) -> int:
    """Write nodes as a ``regrad build`` corpus (JSONL), under the ids ReGrad looks them up by.

    A node is written under ``id_fn(node)``, else its ``ref_doc_id`` when it is its
    document's only node, else its ``node_id`` (stable only for a persisted index or a
    splitter with a deterministic ``id_func``). Keep nodes within the bank's chunk size
    (``regrad build --chunk-tokens``, 200 model tokens by default): a longer node is stored
    as chunks ``<id>#<i>`` and is no longer found by its id. Example::

        write_corpus(index.docstore.docs.values(), "nodes.jsonl")
        # regrad build --corpus nodes.jsonl --meta runs/meta/best --store runs/store

    Returns:
        The number of documents written.
    """
    nodes = [n.node if isinstance(n, NodeWithScore) else n for n in nodes]
    per_document = Counter(n.ref_doc_id for n in nodes if n.ref_doc_id)
    with open(path, "w", encoding="utf-8") as out:
        for node in nodes:
            doc_id = (id_fn(node) if id_fn is not None else None) or (
                node.ref_doc_id if node.ref_doc_id and per_document[node.ref_doc_id] == 1 else node.node_id)
            extra = {k: v for k, v in node.metadata.items()
                     if k not in ("id", "text", ID_KEY) and isinstance(v, (str, int, float, bool))}
            out.write(json.dumps({"id": str(doc_id), "text": node.get_content(), **extra}, ensure_ascii=False) + "\n")
    return len(nodes)
