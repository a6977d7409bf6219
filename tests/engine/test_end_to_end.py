"""End to end on the embedded SmolLM2-135M-Instruct with the shipped meta checkpoint."""

import time
from pathlib import Path

import pytest
import torch

from regrad_engine.chunking import chunk_documents
from regrad_engine.datasets.synthetic import generate_corpus
from regrad_engine.metrics import score_predictions
from regrad_engine.models import load_model, parameter_hash
from regrad_engine.store import build_store, open_engine

META = Path(__file__).resolve().parents[2] / "regrad_engine" / "checkpoints" / "smollm2-135m-synth"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    load_model()  # first call may fetch and convert the GGUF
    start = time.perf_counter()
    model = load_model()
    print(f"embedded model load from the safetensors cache: {time.perf_counter() - start:.2f} s")
    return model


def test_embedded_model_loads_with_chat_template_and_stable_fingerprint(embedded):
    assert embedded.tokenizer.chat_template
    assert load_model(dtype=torch.bfloat16).fingerprint == embedded.fingerprint


def test_regrad_on_held_out_entities_beats_the_base_model_without_drift(embedded, tmp_path):
    corpus = generate_corpus(600, seed=0)  # the checkpoint was meta-trained on this seed's train split
    by_id = corpus.documents_by_id()
    held_out = sorted({qa.doc_id for qa in corpus.test})[:20]
    docs = [{"id": d, "text": by_id[d]["text"]} for d in held_out]
    build_store(tmp_path / "store", chunk_documents(docs, embedded.tokenizer), model=embedded,
                meta_path=str(META), progress=False)
    before = parameter_hash(embedded.model.named_parameters())
    engine = open_engine(tmp_path / "store", model=embedded, k=3)
    qas = [qa for qa in corpus.test if qa.doc_id in set(held_out)][:24]
    questions, answers = [q.question for q in qas], [q.answers for q in qas]
    regrad = engine.answer_batch(questions)
    base = engine.generate(questions, None, None)
    retrieved_gold = sum(qa.doc_id in [h.id for h in a.sources] for qa, a in zip(qas, regrad)) / len(qas)
    regrad_em = score_predictions([a.text for a in regrad], answers).exact_match
    base_em = score_predictions(base, answers).exact_match
    print(f"gold retrieved {retrieved_gold:.2f}; exact match: base {base_em:.2f}, ReGrad parametric {regrad_em:.2f}")
    assert retrieved_gold > 0.9
    assert regrad_em > base_em
    assert engine.answer(questions[0]).text == regrad[0].text  # batched == alone on the real model
    assert parameter_hash(embedded.model.named_parameters()) == before
