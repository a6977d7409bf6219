"""The core-claim evaluation: seven systems on held-out questions, k documents each.

Systems (all greedy, same prompts, same k documents per question, gold among distractors):
    direct         base model, question only
    meta_lora      meta-learned phi applied, no document gradients
    raw_gradients  document gradients taken at a fresh (not meta-learned) LoRA, same alpha
    random_grads   meta-learned phi + gradients of k random bank documents
    regrad         meta-learned phi + the k documents' gradients, parametric (no passages)
    rag            base model with the k passages in the prompt
    regrad_hybrid  ReGrad + the k passages in the prompt
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path

from regrad_engine.bank import GradientBank
from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.chunking import Chunk
from regrad_engine.data import eval_items, load_documents
from regrad_engine.inference import ReGrad
from regrad_engine.lora import LoraSpace, lora_config_from_dict
from regrad_engine.metrics import Scores, score_predictions
from regrad_engine.models import LoadedModel
from regrad_engine.pipeline import add_gradients
from regrad_engine.retrieval import Hit

SYSTEMS = ("direct", "meta_lora", "raw_gradients", "random_grads", "regrad", "rag", "regrad_hybrid")
LABELS = {
    "direct": "Base model (direct)",
    "meta_lora": "Meta-learned LoRA, no document gradients",
    "raw_gradients": "Raw LM gradients, no meta-learning",
    "random_grads": "Random gradients from the bank",
    "regrad": "ReGrad parametric",
    "rag": "RAG (passages in prompt, base model)",
    "regrad_hybrid": "ReGrad hybrid (gradients + passages)",
}


def evaluate_systems(model: LoadedModel, meta: MetaCheckpoint, data_dir: str | Path, *, split: str = "test",
                     k: int = 3, limit: int | None = None, seed: int = 0, systems=SYSTEMS, batch_size: int = 16,
                     max_new_tokens: int = 20, progress: bool = True,
                     log: Callable[[str], None] = print) -> tuple[dict[str, Scores], dict[str, list[str]]]:
    """Score each system on a split; returns (scores, predictions) by system name."""
    items = eval_items(data_dir, split, k=k, seed=seed, limit=limit)
    docs = load_documents(data_dir)
    needed = sorted({d for item in items for d in item.doc_ids})
    chunks = [Chunk(id=d, text=docs[d]["text"], source_id=d, index=0) for d in needed]
    documents = [[Hit(id=d, text=docs[d]["text"], score=0.0) for d in item.doc_ids] for item in items]
    rng = random.Random(seed + 7)
    random_docs = [[Hit(id=d, text=docs[d]["text"], score=0.0) for d in rng.sample(needed, k)] for _ in items]
    questions = [item.question for item in items]
    answers = [item.answers for item in items]

    meta.check_base(model.fingerprint, model.name)
    space = getattr(model.model, "_regrad_space", None) or LoraSpace(model.model, lora_config_from_dict(meta.lora))
    raw = MetaCheckpoint(phi=space.init_phi(seed=seed), alpha=meta.alpha, alpha_mode=meta.alpha_mode,
                         lora=meta.lora, base_model=meta.base_model, base_fingerprint=meta.base_fingerprint)
    predictions: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        needed_engines = [("meta", meta)] + ([("raw", raw)] if "raw_gradients" in systems else [])
        for name, ckpt in needed_engines:
            bank = GradientBank.create(Path(tmp) / name, binding={"eval": name}, shapes=space.shapes, storage_dtype="fp32")
            log(f"computing {len(chunks)} document gradients at the {name} LoRA")
            add_gradients(model.model, model.tokenizer, space, ckpt.phi, chunks, bank, progress=progress)
            engines[name] = ReGrad(model.model, model.tokenizer, space, ckpt, bank=bank, k=k,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, on_the_fly=False)
        runs = {
            "direct": lambda: _plain(engines["meta"], questions, None),
            "meta_lora": lambda: engines["meta"].answer_batch(questions, documents=documents, use_gradients=False),
            "raw_gradients": lambda: engines["raw"].answer_batch(questions, documents=documents),
            "random_grads": lambda: engines["meta"].answer_batch(questions, documents=random_docs),
            "regrad": lambda: engines["meta"].answer_batch(questions, documents=documents),
            "rag": lambda: _plain(engines["meta"], questions, [[h.text for h in d] for d in documents]),
            "regrad_hybrid": lambda: engines["meta"].answer_batch(questions, documents=documents, mode="hybrid"),
        }
        scores = {}
        for name in systems:
            outputs = runs[name]()
            predictions[name] = [o if isinstance(o, str) else o.text for o in outputs]
            scores[name] = score_predictions(predictions[name], answers)
            log(f"{name:14s} EM {scores[name].exact_match:.3f}  F1 {scores[name].f1:.3f}  (n={scores[name].n})")
    return scores, predictions


def _plain(engine: ReGrad, questions, passages) -> list[str]:
    """The base model alone (no LoRA at all), batched."""
    out: list[str] = []
    for start in range(0, len(questions), engine.batch_size):
        chunk = passages[start:start + engine.batch_size] if passages else None
        out += engine.generate(questions[start:start + engine.batch_size], chunk, None)
    return out


def markdown_table(scores: dict[str, Scores]) -> str:
    lines = ["| system | exact match | token F1 | n |", "|---|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {LABELS.get(name, name)} | {s.exact_match:.3f} | {s.f1:.3f} | {s.n} |")
    return "\n".join(lines)
