"""A tiny real store (2-layer Llama, fp32 bank, BM25 index) to damage in every way a user met."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.data import Chunk
from regrad_engine.lora import init_step_sizes
from regrad_engine.models import LoadedModel, model_fingerprint
from tests.conftest import make_model, make_space, random_phi

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
    model = make_model(tokenizer, attn="sdpa")
    space = make_space(model)
    phi = random_phi(space)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny", fingerprint=model_fingerprint(model))
    meta = MetaCheckpoint(phi=phi, alpha=init_step_sizes(phi, "tie", 1.0), alpha_mode="tie", lora=space.spec(),
                          base_model="tiny", base_fingerprint=loaded.fingerprint)
    meta.save(tmp_path / "meta")
    return loaded, tmp_path / "meta"


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
