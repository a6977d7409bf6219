"""Tests for regrad_engine.chunking (offline: tiny tokenizers built in-process)."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from regrad_engine.chunking import (
    Chunk,
    CorpusError,
    chunk_documents,
    chunk_source,
    read_corpus,
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Retrieval augmented generation needs good chunking!",
    "Each chunk gets its own gradient, stored on disk.",
    "Tokenizers return offsets so text can be cut exactly?",
    "Zebras graze near the river while lions sleep.",
]
LONG_TEXT = " ".join(SENTENCES * 6)


def _word_level() -> PreTrainedTokenizerFast:
    words = sorted({w for s in SENTENCES for w in re.findall(r"\w+|[^\w\s]", s)})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _byte_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module", params=["wordlevel", "bytebpe"])
def tokenizer(request):
    return _word_level() if request.param == "wordlevel" else _byte_bpe()


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_short_doc_is_one_chunk_with_doc_id(tokenizer):
    chunks = chunk_documents([{"id": "a", "text": SENTENCES[0], "title": "Fox"}], tokenizer, max_tokens=50)
    assert chunks == [Chunk(id="a", text=SENTENCES[0], source_id="a", index=0, metadata={"title": "Fox"})]


@pytest.mark.parametrize("max_tokens,overlap", [(20, 0), (8, 0), (16, 4)])
def test_long_doc_is_split_within_budget(tokenizer, max_tokens, overlap):
    doc = {"id": "long", "text": LONG_TEXT, "title": "T", "url": "u"}
    chunks = chunk_documents([doc], tokenizer, max_tokens=max_tokens, overlap=overlap)
    assert len(chunks) > 1
    assert [c.id for c in chunks] == [f"long#{i}" for i in range(len(chunks))]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.source_id == "long" and chunk_source(c.id) == "long"
        assert c.metadata == {"title": "T", "url": "u"}
        assert 0 < _n_tokens(tokenizer, c.text) <= max_tokens
        assert c.text in LONG_TEXT
    # Chunks are cut out of the original text in order and cover all of it.
    covered = [(0, 0)]
    for c in chunks:
        prev_start, prev_end = covered[-1]
        start = LONG_TEXT.index(c.text, prev_end if overlap == 0 else prev_start + (c.index > 0))
        assert not LONG_TEXT[prev_end:start].strip()  # nothing skipped between chunks
        covered.append((start, start + len(c.text)))
    assert covered[1][0] == 0 and covered[-1][1] == len(LONG_TEXT)
    if overlap == 0:
        assert "".join(c.text for c in chunks).replace(" ", "") == LONG_TEXT.replace(" ", "")


def test_prefers_sentence_boundaries():
    text = " ".join([SENTENCES[0]] * 5)  # 10 word-level tokens per sentence
    chunks = chunk_documents([{"id": "d", "text": text}], _word_level(), max_tokens=14)
    assert [c.text for c in chunks] == [SENTENCES[0]] * 5


def test_several_docs_keep_order_and_metadata(tokenizer):
    docs = [{"id": "x", "text": LONG_TEXT}, {"id": 7, "text": "Zebras graze.", "metadata": {"lang": "en"}}]
    chunks = chunk_documents(docs, tokenizer, max_tokens=30)
    assert chunks[0].id == "x#0" and chunks[-1].id == "7"
    assert chunks[-1].metadata == {"lang": "en"}


@pytest.mark.parametrize(
    "docs,match",
    [
        ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "duplicate id 'a'"),
        ([{"id": "a"}], "missing or empty 'text'"),
        ([{"id": "a", "text": "   "}], "missing or empty 'text'"),
        ([{"text": "x"}], "document #0: missing or empty 'id'"),
        ([{"id": "a#3", "text": "x"}], "reserved for chunk indices"),
        (["just a string"], "expected a JSON object"),
    ],
)
def test_bad_documents_raise(docs, match):
    with pytest.raises(CorpusError, match=match):
        chunk_documents(docs, _word_level())


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_tokens"):
        chunk_documents([{"id": "a", "text": "x"}], _word_level(), max_tokens=0)
    with pytest.raises(ValueError, match="overlap"):
        chunk_documents([{"id": "a", "text": "x"}], _word_level(), max_tokens=8, overlap=8)


def test_chunk_source():
    assert chunk_source("doc#3") == "doc"
    assert chunk_source("doc") == "doc"
    assert chunk_source("a#b#12") == "a#b"
    assert chunk_source("a#b") == "a#b"


def test_read_corpus_formats(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"id": "a", "text": "alpha", "title": "A"}\n\n{"id": 2, "text": "beta"}\n', encoding="utf-8")
    assert read_corpus(jl) == [{"id": "a", "text": "alpha", "title": "A"}, {"id": "2", "text": "beta"}]

    js = tmp_path / "c.json"
    js.write_text(json.dumps([{"id": "j", "text": "gamma"}]), encoding="utf-8")
    assert read_corpus(js) == [{"id": "j", "text": "gamma"}]

    txt = tmp_path / "notes.txt"
    txt.write_text("delta text", encoding="utf-8")
    assert read_corpus(txt) == [{"id": "notes", "text": "delta text"}]


def test_read_corpus_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "z.jsonl").write_text('{"id": "z1", "text": "zed"}\n', encoding="utf-8")
    (tmp_path / "ignored.md").write_text("nope", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("nope", encoding="utf-8")
    assert [d["id"] for d in read_corpus(tmp_path)] == ["a", "sub/b", "z1"]


def test_read_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="corpus not found"):
        read_corpus(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": \n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: invalid JSON on line 2"):
        read_corpus(bad)
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"id": "a"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"notext\.jsonl:1 \(id 'a'\): missing or empty 'text'"):
        read_corpus(notext)
    notlist = tmp_path / "obj.json"
    notlist.write_text('{"id": "a", "text": "x"}', encoding="utf-8")
    with pytest.raises(CorpusError, match="expected a JSON list"):
        read_corpus(notlist)
    other = tmp_path / "x.csv"
    other.write_text("a,b", encoding="utf-8")
    with pytest.raises(CorpusError, match="unsupported corpus file type"):
        read_corpus(other)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        read_corpus(latin)
    dup = tmp_path / "dupdir"
    dup.mkdir()
    (dup / "a.txt").write_text("one", encoding="utf-8")
    (dup / "b.jsonl").write_text('{"id": "a", "text": "two"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="duplicate id 'a'"):
        read_corpus(dup)
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no .jsonl, .json or .txt files"):
        read_corpus(empty)


def test_no_chunk_is_shorter_than_two_tokens(tokenizer):
    from regrad_engine.chunking import _count_tokens

    text = " ".join(["word"] * 200) + " end"
    for max_tokens in (8, 16, 200):
        pieces = chunk_documents([{"id": "d", "text": text}], tokenizer, max_tokens=max_tokens)
        assert all(2 <= _count_tokens(tokenizer, c.text) <= max_tokens for c in pieces), max_tokens
