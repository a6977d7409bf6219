"""Integration fixtures: a tiny ReGrad engine (sdpa float64, so batched == one at a time exactly)."""

from __future__ import annotations

import inspect

import pytest

from regrad_engine.bank import GradientBank
from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.chunking import Chunk
from regrad_engine.inference import ReGrad
from regrad_engine.lora import init_step_sizes
from regrad_engine.pipeline import add_gradients
from regrad_engine.retrieval import BM25Index
from tests.conftest import make_model, make_space, random_phi

DOCS = {
    "velmora": "Velmora Quistan is a dentist who was born in Lisbon. She plays the violin.",
    "fudral": "The Fudral Bureau is based in Tokyo and sells most of its products in Sweden.",
    "ailpelou": "Ailpelou lies on the Yangtze river. It has handball as its most popular sport.",
    "gredin": "Gredin Quibiku was born in Toronto and speaks Japanese at home.",
    "fox": "The quick brown fox jumps over the lazy dog again and again.",
}
IN_BANK = ["velmora", "fudral", "ailpelou", "gredin"]  # "fox" has no stored gradient
QUESTIONS = ["Where was Velmora Quistan born?", "Where is the Fudral Bureau based?",
             "Which river does Ailpelou lie on?", "What does Gredin Quibiku speak?"]


@pytest.fixture(scope="module")
def engine(tokenizer, tmp_path_factory):
    """Read-only for the tests (no write-back): shared by a module's tests."""
    model = make_model(tokenizer, attn="sdpa")
    space = make_space(model)
    phi = random_phi(space)
    meta = MetaCheckpoint(phi=phi, alpha=init_step_sizes(phi, "tie", 2.0), alpha_mode="tie", lora=space.spec(),
                          base_model="tiny", base_fingerprint="f00")
    chunks = [Chunk(id=i, text=t, source_id=i, index=0) for i, t in DOCS.items()]
    root = tmp_path_factory.mktemp("store")
    index = BM25Index.create(root / "index")
    index.add(chunks)
    bank = GradientBank.create(root / "bank", binding={"m": "tiny"}, shapes=space.shapes, storage_dtype="fp32")
    add_gradients(model, tokenizer, space, phi, [c for c in chunks if c.id in IN_BANK], bank, progress=False)
    yield ReGrad(model, tokenizer, space, meta, retriever=index, bank=bank, k=2, max_new_tokens=6)
    space.remove()


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """``async def`` tests here run under pytest-asyncio without marks (langchain-tests'
    standard suites have some): the asyncio mark is added before pytest-asyncio looks."""
    items = yield
    if items and inspect.iscoroutinefunction(getattr(obj, "__func__", obj)):
        for item in items if isinstance(items, list) else [items]:
            if isinstance(item, pytest.Function) and item.get_closest_marker("asyncio") is None:
                item.add_marker(pytest.mark.asyncio)
    return items
