"""Evaluation: ReGrad beside the baselines and controls that expose a fake win.

Two settings:
    given      each question's k passages from the data (gold among hard negatives)
    retrieval  BM25 top-k over the pooled test corpus (every test passage), as a deployed
               app sees it; gold recall@k is reported beside the scores

Systems (greedy, same prompts and the same k documents per question):
    direct          base model, question only
    rag             base model, the k passages in the prompt
    meta_lora       meta-learned phi, no document gradients, no passages
    format_control  meta-learned phi, the k passages in the prompt, no gradients: what the
                    LoRA teaches about answer form (hybrid must beat it to claim knowledge)
    random_grads    meta-learned phi + the gradients of k random passages (drawn by the seed
                    from all the run's passages: by chance one of the question's own now and
                    then, 8 of 1,200 questions in the shipped test run, which favours the control)
    regrad          meta-learned phi + the k passages' gradients (parametric)
    regrad_hybrid   ReGrad + the k passages in the prompt
    raw_gradients   gradients taken at a fresh LoRA (no meta-learning), same alpha

Every set (the ``source`` of a question) gets its own table: EM, token F1 and
answer-contained with 95% bootstrap intervals, the share of each system's most frequent
answer (a collapse detector), and the majority-answer baseline (always answering the
set's most frequent gold answer).
"""

from __future__ import annotations

import functools
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from regrad_engine.bank import GradientBank
from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.data import Chunk, DataError, EvalItem, eval_items, load_documents
from regrad_engine.inference import ReGrad
from regrad_engine.lora import LoraSpace
from regrad_engine.metrics import (
    Scores,
    bootstrap_interval,
    contains_answer,
    exact_match,
    normalize_answer,
    score_predictions,
    token_f1,
    top_answer_share,
)
from regrad_engine.models import LoadedModel
from regrad_engine.retrieval import BM25Index, Hit
from regrad_engine.store import add_gradients

SYSTEMS = ("direct", "rag", "meta_lora", "format_control", "random_grads", "raw_gradients", "regrad",
           "regrad_hybrid")
ALL_SYSTEMS = SYSTEMS
SETTINGS = ("given", "retrieval")
LABELS = {
    "direct": "Base model (direct)",
    "rag": "RAG (passages in prompt, base model)",
    "meta_lora": "Meta-learned LoRA, no gradients, no passages",
    "format_control": "Format control: meta-learned LoRA + passages, no gradients",
    "random_grads": "Random passages' gradients",
    "regrad": "ReGrad parametric",
    "regrad_hybrid": "ReGrad hybrid (gradients + passages)",
    "raw_gradients": "Raw LM gradients, no meta-learning",
}
METRICS = {"exact_match": exact_match, "f1": token_f1, "contains": contains_answer}


@dataclass
class EvalRun:
    """Questions, the documents each system used, and every system's answers."""

    setting: str
    items: list[EvalItem]
    documents: list[list[Hit]]
    predictions: dict[str, list[str]] = field(default_factory=dict)

    def gold_recall(self) -> list[float]:
        """Per question: 1.0 if its gold passage is among its documents."""
        return [float(item.gold_id in {h.id for h in docs}) for item, docs in zip(self.items, self.documents)]


def evaluate_systems(model: LoadedModel, meta: MetaCheckpoint, data_dir: str | Path, *, split: str = "test",
                     k: int = 3, limit: int | None = None, seed: int = 0, systems: Sequence[str] = SYSTEMS,
                     setting: str = "given", batch_size: int = 16, max_new_tokens: int = 20, progress: bool = True,
                     log: Callable[[str], None] = print, previous: Sequence[dict] | None = None,
                     on_system: Callable[[EvalRun], None] | None = None, gamma: float = 1.0) -> EvalRun:
    """Answer a split with each system.

    Args:
        limit: First N questions of each set (source).
        setting: ``"given"`` or ``"retrieval"`` (see the module docstring).
        previous: Per-question records (:func:`per_question`) of an earlier run over the
            same questions: the systems answered there are kept and not run again.
        on_system: Called with the run after each system finishes (e.g. to save it, so an
            interrupted evaluation loses at most the system in progress).
        gamma: Test-time step scale of every system that applies gradients (ReGrad, hybrid,
            random and raw gradients), as ``regrad ask --gamma``.

    Raises:
        DataError: Unknown system or setting, a data directory without the needed files, or
            ``previous`` holding other questions.
    """
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown or setting not in SETTINGS:
        raise DataError(f"unknown system {unknown[0]!r}: choose from {', '.join(ALL_SYSTEMS)}" if unknown else
                        f"unknown setting {setting!r}: choose from {', '.join(SETTINGS)}")
    items = eval_items(data_dir, split, k=k, seed=seed, limit=limit)
    docs = load_documents(data_dir)
    if setting == "given":
        documents = [[Hit(d, docs[d]["text"], 0.0) for d in item.doc_ids] for item in items]
    else:
        searched = sorted(d for d, row in docs.items() if row.get("split", split) == split)
        documents = _retrieve(docs, searched, [item.question for item in items], k)
    # random passages come from the run's documents (test passages whose gradients are
    # computed anyway); a question's own passage is not excluded
    pool = sorted({h.id for d in documents for h in d})
    rng = random.Random(seed + 7)
    random_docs = [[Hit(d, docs[d]["text"], 0.0) for d in rng.sample(pool, min(k, len(pool)))] for _ in items]
    run = EvalRun(setting, items, documents)
    if previous is not None:
        run.predictions.update(_kept_predictions(previous, per_question(run)))
    todo = [s for s in systems if s not in run.predictions]
    if run.predictions:
        log(f"kept from the earlier run: {', '.join(run.predictions)}"
            + (f"; to answer: {', '.join(todo)}" if todo else "; nothing left to answer"))
    questions = [item.question for item in items]
    passages = [[h.text for h in d] for d in documents]

    meta.check_base(model.fingerprint, model.name, tokenizer=model.tokenizer)
    space = LoraSpace.attach(model.model, meta.lora)
    needed = {h.id: h.text for d in documents for h in d}  # random_docs are drawn from these
    chunks = [Chunk(id=d, text=t, source_id=d, index=0) for d, t in sorted(needed.items())]
    with tempfile.TemporaryDirectory() as tmp:
        def engine(name: str, ckpt: MetaCheckpoint) -> ReGrad:
            bank = GradientBank.create(Path(tmp) / name, binding={"eval": name}, shapes=space.shapes,
                                       storage_dtype="fp32")
            log(f"computing {len(chunks)} passage gradients at the {name} LoRA")
            add_gradients(model.model, model.tokenizer, space, ckpt.phi, chunks, bank, progress=progress)
            return ReGrad(model.model, model.tokenizer, space, ckpt, bank=bank, k=k, gamma=gamma,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, on_the_fly=False)

        plain = ReGrad(model.model, model.tokenizer, space, meta, k=k, max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
        main = functools.cache(lambda: engine("meta", meta))  # gradients computed when a system first needs them

        runs: dict[str, Callable[[], list]] = {
            "direct": lambda: _plain(plain, questions, None),
            "rag": lambda: _plain(plain, questions, passages),
            "meta_lora": lambda: plain.answer_batch(questions, documents=documents, use_gradients=False),
            "format_control": lambda: plain.answer_batch(questions, documents=documents, use_gradients=False,
                                                         mode="hybrid"),
            "random_grads": lambda: main().answer_batch(questions, documents=random_docs),
            "regrad": lambda: main().answer_batch(questions, documents=documents),
            "regrad_hybrid": lambda: main().answer_batch(questions, documents=documents, mode="hybrid"),
            "raw_gradients": lambda: engine("raw", _raw(space, meta, seed)).answer_batch(questions, documents=documents),
        }
        for name in todo:
            outputs = runs[name]()
            run.predictions[name] = [o if isinstance(o, str) else o.text for o in outputs]
            run.predictions = {s: run.predictions[s] for s in ALL_SYSTEMS if s in run.predictions}
            log(f"{name:15s} done ({len(outputs)} answers)")
            if on_system is not None:
                on_system(run)
    return run


def _kept_predictions(previous: Sequence[dict], current: list[dict]) -> dict[str, list[str]]:
    """The answers of an earlier run, by system, if it asked exactly these questions with these passages."""
    fields = ("id", "source", "question", "answers", "documents", "gold_id")
    if len(previous) != len(current) or any(
            not isinstance(old, dict) or any(old.get(f) != new[f] for f in fields)
            for old, new in zip(previous, current)):
        raise DataError("the earlier run asked other questions or gave other passages than this one (was the data "
                        "directory rebuilt?): write this evaluation to a new output file")
    kept: dict[str, list[str]] = {}
    by_question = [old.get("predictions") if isinstance(old.get("predictions"), dict) else {} for old in previous]
    for name in ALL_SYSTEMS:
        answers = [predictions.get(name) for predictions in by_question]
        if all(isinstance(a, str) for a in answers):
            kept[name] = answers
        elif any(a is not None for a in answers):
            raise DataError(f"the earlier run has {name!r} answers for only some questions, or answers that are not "
                            "text: repair it or write this evaluation to a new output file")
    return kept


def _retrieve(docs: dict[str, dict], pool: list[str], questions: list[str], k: int) -> list[list[Hit]]:
    """BM25 top-k over the pooled passages (title + text indexed, text returned)."""
    with tempfile.TemporaryDirectory() as tmp:
        index = BM25Index.create(Path(tmp) / "bm25")
        index.add([{"id": d, "text": f"{docs[d].get('title', '')} {docs[d]['text']}".strip()} for d in pool])
        found = index.retrieve_batch(questions, k)
    return [[Hit(h.id, docs[h.id]["text"], h.score) for h in hits] for hits in found]


def _raw(space: LoraSpace, meta: MetaCheckpoint, seed: int) -> MetaCheckpoint:
    return MetaCheckpoint(phi=space.init_phi(seed=seed), alpha=meta.alpha, alpha_mode=meta.alpha_mode,
                          lora=meta.lora, base_model=meta.base_model, base_fingerprint=meta.base_fingerprint,
                          document_bos=meta.document_bos)


def _plain(engine: ReGrad, questions: Sequence[str], passages) -> list[str]:
    """The base model alone (no LoRA at all), batched."""
    out: list[str] = []
    for start in range(0, len(questions), engine.batch_size):
        chunk = passages[start:start + engine.batch_size] if passages else None
        out += engine.generate(questions[start:start + engine.batch_size], chunk, None)
    return out


# --------------------------------------------------------------------------- reporting
def overall_scores(run: EvalRun) -> dict[str, Scores]:
    """Mean EM / F1 / contained per system over every question of the run."""
    answers = [item.answers for item in run.items]
    return {name: score_predictions(preds, answers) for name, preds in run.predictions.items()}


def markdown_table(scores: dict[str, Scores]) -> str:
    """One table of overall scores (see :func:`markdown_tables` for the per-set report)."""
    lines = ["| system | exact match | token F1 | n |", "|---|---|---|---|"]
    for name, s in scores.items():
        lines.append(f"| {LABELS.get(name, name)} | {s.exact_match:.3f} | {s.f1:.3f} | {s.n} |")
    return "\n".join(lines)


def summarize(run: EvalRun, *, seed: int = 0) -> dict[str, dict]:
    """Per set (source; ``"all"`` when a split has one unnamed set): n, majority answer,
    gold recall, and per system each metric's mean and 95% bootstrap interval plus the
    share of its most frequent answer."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(run.items):
        groups.setdefault(item.source or "all", []).append(i)
    recall = run.gold_recall()
    report = {}
    for source, rows in groups.items():
        answers = [run.items[i].answers for i in rows]
        majority, count = Counter(normalize_answer(a[0]) for a in answers).most_common(1)[0]
        entry = {"n": len(rows), "majority_answer": majority, "majority_share": count / len(rows),
                 "gold_recall": sum(recall[i] for i in rows) / len(rows), "systems": {}}
        baselines = {"majority": [majority] * len(rows)}
        for name, predictions in list(baselines.items()) + list(run.predictions.items()):
            preds = predictions if name == "majority" else [predictions[i] for i in rows]
            scores = {}
            for metric, fn in METRICS.items():
                values = [fn(p, a) for p, a in zip(preds, answers)]
                low, high = bootstrap_interval(values, seed=seed)
                scores[metric] = {"mean": sum(values) / len(values), "low": low, "high": high}
            top, share = top_answer_share(preds)
            scores["top_answer"], scores["top_answer_share"] = top, share
            entry["systems"][name] = scores
        report[source] = entry
    return report


def markdown_tables(report: dict[str, dict], setting: str = "given") -> str:
    """One markdown table per set."""
    out = []
    for source, entry in report.items():
        out.append(f"**{source}** ({setting}, n={entry['n']}, gold passage among the k: "
                   f"{entry['gold_recall']:.0%}; most frequent gold answer {entry['majority_answer']!r} "
                   f"= {entry['majority_share']:.0%})\n")
        out.append("| system | EM [95% CI] | F1 [95% CI] | answer contained | top answer share |")
        out.append("|---|---|---|---|---|")
        for name, s in entry["systems"].items():
            label = "Majority answer (constant)" if name == "majority" else LABELS.get(name, name)
            cells = [f"{s[m]['mean']:.3f} [{s[m]['low']:.2f}, {s[m]['high']:.2f}]" for m in ("exact_match", "f1")]
            out.append(f"| {label} | {cells[0]} | {cells[1]} | {s['contains']['mean']:.3f} | "
                       f"{s['top_answer_share']:.2f} ({s['top_answer'][:20]!r}) |")
        out.append("")
    return "\n".join(out)


def per_question(run: EvalRun) -> list[dict]:
    """Per-question records for the JSON output."""
    return [{"id": item.id, "source": item.source, "question": item.question, "answers": item.answers,
             "documents": [h.id for h in docs], "gold_id": item.gold_id,
             "predictions": {name: preds[i] for name, preds in run.predictions.items()}}
            for i, (item, docs) in enumerate(zip(run.items, run.documents))]
