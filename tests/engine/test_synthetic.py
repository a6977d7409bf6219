"""Tests for regrad_engine.datasets.synthetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from regrad_engine.data import eval_items, load_documents, meta_examples
from regrad_engine.datasets.synthetic import SyntheticCorpus, generate_corpus


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return generate_corpus(150, seed=0)


def test_deterministic_and_seed_dependent(corpus: SyntheticCorpus) -> None:
    assert generate_corpus(150, seed=0) == corpus
    other = generate_corpus(150, seed=1)
    assert other.documents != corpus.documents


def test_counts_and_kinds(corpus: SyntheticCorpus) -> None:
    qas = corpus.train + corpus.dev + corpus.test
    assert len(corpus.documents) == 150
    assert len(qas) == 150 * 3
    assert len({qa.id for qa in qas}) == len(qas)
    assert {d["kind"] for d in corpus.documents} == {"person", "place", "organisation"}
    assert len(generate_corpus(20, seed=3, facts_per_entity=5).train) > 0


def test_splits_disjoint_by_entity(corpus: SyntheticCorpus) -> None:
    docs = {name: {qa.doc_id for qa in corpus.split(name)} for name in ("train", "dev", "test")}
    assert not docs["train"] & docs["dev"]
    assert not docs["train"] & docs["test"]
    assert not docs["dev"] & docs["test"]
    assert len(docs["test"]) == 30 and len(docs["dev"]) == 15


def test_names_unique_and_first_words_distinct(corpus: SyntheticCorpus) -> None:
    entities = [d["entity"] for d in corpus.documents]
    assert len(set(entities)) == len(entities)
    first_words = [e.split()[0] for e in entities]
    assert len(set(first_words)) == len(first_words)


def test_answers_in_doc_and_entity_in_question(corpus: SyntheticCorpus) -> None:
    by_id = corpus.documents_by_id()
    for qa in corpus.train + corpus.dev + corpus.test:
        doc = by_id[qa.doc_id]
        assert qa.answers[0] in doc["text"], (qa, doc)
        assert qa.entity == doc["entity"]
        assert qa.entity in qa.question
        assert qa.question.endswith("?")
        # the entity's name occurs in no other document
        if qa.attribute == "birth_city":
            others = [d for d in corpus.documents if qa.entity in d["text"]]
            assert others == [doc]


def test_document_length(corpus: SyntheticCorpus) -> None:
    for doc in corpus.documents:
        words = len(doc["text"].split())
        assert 20 <= words <= 70, doc
        assert doc["text"].startswith(doc["entity"]) or doc["text"].startswith("The ")


def test_written_corpus_reads_back_through_the_data_layer(corpus: SyntheticCorpus, tmp_path: Path) -> None:
    corpus.write(tmp_path / "syn")
    assert sorted(p.name for p in (tmp_path / "syn").iterdir()) == [
        "corpus.jsonl", "dev.jsonl", "test.jsonl", "train.jsonl"]
    assert list(load_documents(tmp_path / "syn").values()) == corpus.documents
    items = eval_items(tmp_path / "syn", "dev", k=3, seed=5)
    assert sorted(i.question for i in items) == sorted(qa.question for qa in corpus.dev)
    assert items == eval_items(tmp_path / "syn", "dev", k=3, seed=5)  # seeded
    dev_docs = {qa.doc_id for qa in corpus.dev}
    for item in items:  # gold among k-1 distractors drawn from the same split's documents
        assert len(set(item.doc_ids)) == 3 and item.gold_id in item.doc_ids and set(item.doc_ids) <= dev_docs
    tasks = meta_examples(tmp_path / "syn", "dev", k=3, seed=5)
    by_id = load_documents(tmp_path / "syn")
    assert [t.passages for t in tasks] == [[by_id[d]["text"] for d in i.doc_ids] for i in items]



def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        generate_corpus(10, facts_per_entity=7)
    with pytest.raises(ValueError):
        generate_corpus(10, dev_fraction=0.5, test_fraction=0.5)
