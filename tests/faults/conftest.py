"""A tiny real store (2-layer Llama, fp32 bank, BM25 index) to damage in every way a user met."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regrad_engine.data import Chunk
from tests.conftest import make_loaded_with_meta

FACTS = [("Velmora Quistan", "Lisbon", "violin"), ("Fudral Oxby", "Nairobi", "harmonica"),
         ("Ailpelou Trask", "Quito", "cello"), ("Gredin Quibiku", "Toronto", "drums"),
         ("Sorvel Annik", "Hanoi", "flute"), ("Bisor Rarel", "Seoul", "piano"),
         ("Drotairk Pofurk", "Denver", "banjo"), ("Surna Dodraind", "Lagos", "oboe")]
DOCS = {f"doc{i}": f"{name} was born in {city} and plays the {instrument} every evening."
        for i, (name, city, instrument) in enumerate(FACTS)}


def chunks(docs: dict[str, str] = DOCS) -> list[Chunk]:
    return [Chunk(id=i, text=t, source_id=i, index=0) for i, t in docs.items()]


def write_corpus(path: Path, docs: dict[str, str] = DOCS) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs.items()))
    return path


@pytest.fixture()
def tiny(tokenizer, tmp_path):
    """(LoadedModel, meta checkpoint directory) of a tiny deterministic model."""
    return make_loaded_with_meta(tokenizer, tmp_path / "meta"), tmp_path / "meta"


@pytest.fixture()
def store(tiny, tmp_path):
    """A built store over DOCS with one document per shard: (LoadedModel, meta dir, store dir)."""
    from regrad_engine.store import build_store

    model, meta = tiny
    build_store(tmp_path / "store", chunks(), model=model, meta_path=str(meta), doc_max_tokens=32,
                storage_dtype="fp32", batch_size=1, flush_every=1, progress=False)
    return model, meta, tmp_path / "store"


def shards(store: Path) -> list[Path]:
    manifest = json.loads((store / "bank" / "manifest.json").read_text())
    return [store / "bank" / s["file"] for s in manifest["shards"]]
