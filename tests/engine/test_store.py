"""The store: regrad.json (versioned, relative checkpoint path), opening a hand-made bank, delete by source id."""

import json
import shutil

import pytest
from tests.conftest import make_loaded_with_meta

from regrad_engine.bank import GradientBank
from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.data import Chunk
from regrad_engine.errors import StoreError, UnknownDocumentError
from regrad_engine.lora import LoraSpace
from regrad_engine.retrieval import BM25Index
from regrad_engine.store import STORE_FILE, Store, add_gradients, build_store, open_engine

CHUNKS = [Chunk("big#0", "Velmora Quistan was born in Lisbon and plays the violin.", "big", 0),
          Chunk("big#1", "Velmora Quistan works as a dentist in a small harbour town.", "big", 1),
          Chunk("small", "Fudral Oxby was born in Nairobi and plays the harmonica.", "small", 0)]


@pytest.fixture()
def setup(tokenizer, tmp_path):
    return make_loaded_with_meta(tokenizer, tmp_path / "work" / "meta"), tmp_path / "work"


def test_store_records_a_relative_checkpoint_and_moves_with_it(setup, tmp_path):
    model, work = setup
    build_store(work / "store", CHUNKS, model=model, meta_path=str(work / "meta"), doc_max_tokens=32,
                storage_dtype="fp32", progress=False)
    info = json.loads((work / "store" / STORE_FILE).read_text())
    assert info["format_version"] == 1 and info["kind"] == "regrad-store" and info["meta"] == "../meta"
    assert info["retriever"] == {"type": "bm25"}
    before = open_engine(work / "store", model=model).answer("Where was Velmora Quistan born?", k=2)
    shutil.move(work, tmp_path / "moved")  # store and checkpoint move together
    after = open_engine(tmp_path / "moved" / "store", model=model).answer("Where was Velmora Quistan born?", k=2)
    assert after.text == before.text and [h.id for h in after.sources] == [h.id for h in before.sources]


def test_a_bank_made_by_hand_opens_with_open_engine(setup):
    model, work = setup
    store = Store.create(work / "hand", model_name="tiny", meta_path=work / "meta", doc_max_tokens=32)
    meta = MetaCheckpoint.load(work / "meta")
    space = LoraSpace.attach(model.model, meta.lora)
    with GradientBank.create(work / "hand" / "bank", binding=store.binding(model, meta), shapes=space.shapes,
                             storage_dtype="fp32") as bank:
        add_gradients(model.model, model.tokenizer, space, meta.phi, CHUNKS, bank, doc_max_tokens=32, progress=False)
    index = BM25Index.create(work / "hand" / "index")
    index.add(CHUNKS)
    index.save()
    engine = open_engine(work / "hand", model=model, on_the_fly=False)  # every gradient must come from the bank
    assert engine.answer("Who plays the harmonica?", k=1).sources[0].id == "small"


def test_deleting_a_source_id_removes_all_its_chunks(setup):
    model, work = setup
    build_store(work / "store", CHUNKS, model=model, meta_path=str(work / "meta"), doc_max_tokens=32,
                storage_dtype="fp32", progress=False)
    store = Store.open(work / "store")
    with pytest.raises(UnknownDocumentError, match="nope"):
        store.delete(["small", "nope"])
    assert sorted(store.bank().ids()) == ["big#0", "big#1", "small"]  # nothing removed
    assert store.delete(["big"]) == 2
    assert store.bank().ids() == ["small"] and BM25Index.open(work / "store" / "index").ids() == ["small"]


def test_old_and_damaged_store_files(setup, tmp_path):
    model, work = setup
    old = tmp_path / "old"
    old.mkdir()  # a store of an earlier version: no format_version, absolute checkpoint path
    (old / STORE_FILE).write_text(json.dumps({"model": "tiny", "meta": str(work / "meta"), "doc_max_tokens": 32}))
    assert Store.open(old).meta_path == (work / "meta").resolve() and Store.open(old).retriever == {"type": "bm25"}
    (old / STORE_FILE).write_text("{not json")
    with pytest.raises(StoreError, match="damaged"):
        Store.open(old)
    (old / STORE_FILE).write_text(json.dumps({"format_version": 99, "kind": "regrad-store", "model": "m",
                                              "meta": "x", "doc_max_tokens": 8}))
    with pytest.raises(StoreError, match="upgrade regrad"):
        Store.open(old)
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="is a file"):
        Store.open(tmp_path / "file")
    with pytest.raises(StoreError, match="no regrad store"):
        Store.open(tmp_path / "nowhere")


def test_a_bank_built_before_documents_began_with_bos_is_refused_not_mixed(setup, monkeypatch):
    """A tokenizer that puts bos first (Llama 3, Gemma) now gets it before every document; a bank
    of gradients computed without it must not silently take new ones computed with it."""
    from regrad_engine import store as store_module
    from regrad_engine.errors import BankMismatchError

    model, work = setup
    build_store(work / "store", CHUNKS, model=model, meta_path=str(work / "meta"), doc_max_tokens=32,
                storage_dtype="fp32", progress=False)
    assert "document_bos" not in Store.open(work / "store").binding(model, MetaCheckpoint.load(work / "meta"))
    monkeypatch.setattr(store_module, "bos_prefix", lambda tokenizer: [1])  # as if the tokenizer had bos
    with pytest.raises(BankMismatchError, match="document_bos"):
        open_engine(work / "store", model=model)
