"""Tests for regrad_engine.retrieval.BM25Index (small on-disk indexes under tmp_path)."""

from __future__ import annotations

import json

import pytest

from regrad_engine.chunking import Chunk
from regrad_engine.retrieval import BM25Index, Hit, RetrievalError, Retriever

DOCS = [
    {"id": "cats", "text": "Cats are small domesticated felines that purr and chase mice.", "title": "Cats"},
    {"id": "rust", "text": "The Rust borrow checker enforces memory safety without garbage collection."},
    {"id": "paris", "text": "Paris is the capital of France and home of the Eiffel Tower."},
    {"id": "bread", "text": "Sourdough bread rises slowly thanks to wild yeast fermentation."},
    {"id": "lora", "text": "LoRA adapters add low-rank matrices to frozen transformer weights."},
]


@pytest.fixture
def index(tmp_path):
    idx = BM25Index.create(tmp_path / "idx")
    assert idx.add(DOCS) == len(DOCS)
    return idx


def test_distinctive_query_ranks_right_doc_first(index):
    hits = index.retrieve("Which felines chase mice?", k=3)
    assert hits[0].id == "cats"
    assert hits[0].metadata == {"title": "Cats"}
    assert hits[0].text == DOCS[0]["text"]
    assert index.retrieve("borrow checking in rust", k=1)[0].id == "rust"  # stemming: checking -> check
    assert all(h.score > 0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_k_bounds(index):
    assert len(index.retrieve("the capital of France", k=1)) == 1
    many = index.retrieve("cats rust paris sourdough lora", k=50)  # fewer docs than k
    assert sorted(h.id for h in many) == sorted(d["id"] for d in DOCS)
    for bad_k in (0, -1):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.retrieve("cats", k=bad_k)


@pytest.mark.parametrize("query", ["", "   "])
def test_empty_query_raises(index, query):
    with pytest.raises(ValueError, match="query is empty"):
        index.retrieve(query, k=2)


def test_stopwords_only_or_unknown_words_give_no_hits(index):
    assert index.retrieve("the and of is", k=3) == []
    assert index.retrieve("xylophone", k=3) == []


def test_single_doc_and_empty_index(tmp_path):
    idx = BM25Index.create(tmp_path / "one")
    assert idx.retrieve("anything", k=3) == []
    idx.add([{"id": "only", "text": "a lonely document about lighthouses"}])
    assert [h.id for h in idx.retrieve("lighthouses", k=5)] == ["only"]
    idx2 = BM25Index.create(tmp_path / "stop")
    idx2.add([{"id": "s", "text": "the and of"}])  # no indexable token at all
    assert idx2.retrieve("the", k=1) == []
    idx2.save()
    assert BM25Index.open(tmp_path / "stop").retrieve("and", k=1) == []


def test_incremental_add_replace_delete(index):
    index.retrieve("cats", k=1)  # build the matrix once
    index.add([Chunk(id="doc#0", text="Volcanoes erupt molten lava.", source_id="doc", index=0, metadata={"t": 1})])
    hit = index.retrieve("lava volcano", k=2)[0]
    assert (hit.id, hit.metadata) == ("doc#0", {"t": 1})
    assert len(index) == len(DOCS) + 1 and "doc#0" in index

    assert index.add([{"id": "cats", "text": "Glaciers carve valleys."}]) == 1  # replace by id
    assert len(index) == len(DOCS) + 1
    assert index.retrieve("felines purr", k=3) == []
    assert index.retrieve("glaciers", k=1)[0].id == "cats"
    assert index.get("cats") == Hit("cats", "Glaciers carve valleys.", 0.0, {})

    assert index.delete(["paris", "missing"]) == 1
    assert "paris" not in index and index.retrieve("Eiffel tower", k=3) == []
    with pytest.raises(KeyError, match="paris"):
        index.get("paris")
    assert index.delete("paris") == 0


def test_last_duplicate_in_one_batch_wins(tmp_path):
    idx = BM25Index.create(tmp_path / "d")
    assert idx.add([{"id": "a", "text": "first apple"}, {"id": "a", "text": "second banana"}]) == 2
    assert len(idx) == 1 and idx.get("a").text == "second banana"


def test_persistence_across_open(index, tmp_path):
    path = tmp_path / "idx"
    expected = index.retrieve("capital of France", k=3)
    index.save()
    assert sorted(p.name for p in path.iterdir()) == ["bm25-1", "docs.jsonl", "regrad-bm25.json"]
    reopened = BM25Index.open(path)
    assert reopened.retrieve("capital of France", k=3) == expected
    assert reopened.ids() == index.ids()

    # add/delete without save are still on disk (append-only doc store) and get re-indexed
    reopened.add([{"id": "new", "text": "Quantum computers use qubits."}])
    reopened.delete(["bread"])
    again = BM25Index.open(path, mmap=False)
    assert again.retrieve("qubits", k=1)[0].id == "new" and "bread" not in again
    again.save()
    assert sorted(p.name for p in path.iterdir()) == ["bm25-2", "docs.jsonl", "regrad-bm25.json"]
    lines = (path / "docs.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(again) and all("deleted" not in json.loads(line) for line in lines)
    assert BM25Index.open(path).retrieve("qubits", k=1)[0].id == "new"


def test_truncated_store_line_is_tolerated(index, tmp_path):
    index.save()
    with open(tmp_path / "idx" / "docs.jsonl", "ab") as f:
        f.write(b'{"id": "half", "te')  # interrupted append
    idx = BM25Index.open(tmp_path / "idx")
    assert "half" not in idx and len(idx) == len(DOCS)
    idx.add([{"id": "later", "text": "Penguins huddle together."}])
    assert BM25Index.open(tmp_path / "idx").retrieve("penguins", k=1)[0].id == "later"


def test_a_create_killed_before_its_metadata_is_created_over(tmp_path):
    """create() writes the empty doc store, then the metadata: a kill between them must not block the resume."""
    for leftovers in (["docs.jsonl"], ["docs.jsonl", "regrad-bm25.json.tmp"], ["docs.jsonl.tmp"]):
        path = tmp_path / "-".join(leftovers)
        path.mkdir()
        for name in leftovers:
            (path / name).write_bytes(b"" if name == "docs.jsonl" else b"{")
        idx = BM25Index.open_or_create(path)
        idx.add([{"id": "a", "text": "Penguins huddle together."}])
        assert BM25Index.open(path).retrieve("penguins", k=1)[0].id == "a"
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "docs.jsonl").write_text('{"id": "a", "text": "t"}\n')  # documents without metadata: not ours to drop
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    for path in (kept, tmp_path / "other"):
        with pytest.raises(RetrievalError, match="already exists"):
            BM25Index.open_or_create(path)
    assert (kept / "docs.jsonl").read_text() == '{"id": "a", "text": "t"}\n'


def test_open_create_errors(tmp_path, index):
    with pytest.raises(RetrievalError, match="no BM25 index at .*regrad build"):
        BM25Index.open(tmp_path / "nothing")
    with pytest.raises(RetrievalError, match="already exists"):
        BM25Index.create(tmp_path / "idx")
    with pytest.raises(RetrievalError, match="unknown stemmer"):
        BM25Index.create(tmp_path / "x", stemmer="klingon")
    with pytest.raises(RetrievalError, match="needs a non-empty string 'text'"):
        index.add([{"id": "a"}])
    with pytest.raises(RetrievalError, match="not JSON-serializable"):
        index.add([{"id": "a", "text": "t", "metadata": {"x": object()}}])
    assert "a" not in index
    assert len(BM25Index.open_or_create(tmp_path / "idx")) == len(DOCS)
    assert len(BM25Index.open_or_create(tmp_path / "fresh", stemmer=None, stopwords=None)) == 0


def test_no_stemmer_no_stopwords(tmp_path):
    idx = BM25Index.create(tmp_path / "raw", stemmer=None, stopwords=None)
    idx.add(DOCS)
    assert idx.retrieve("the", k=1)  # "the" is a term now
    assert idx.retrieve("felines", k=1)[0].id == "cats"
    assert idx.retrieve("feline", k=1) == []  # no stemming


def test_protocol_batch_and_ties(index):
    assert isinstance(index, Retriever)
    queries = ["felines", "bread yeast", "the of", "transformer weights"]
    assert index.retrieve_batch(queries, k=2) == [index.retrieve(q, k=2) for q in queries]
    with pytest.raises(ValueError):
        index.retrieve_batch(["ok", ""], k=2)
    index.add([{"id": "z", "text": "twin text"}, {"id": "b", "text": "twin text"}, {"id": "m", "text": "twin text"}])
    assert [h.id for h in index.retrieve("twin", k=2)] == ["b", "m"]
