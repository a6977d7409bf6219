"""QA data on disk, turned into meta-learning tasks and evaluation sets.

A data directory holds ``corpus.jsonl`` (documents: id, text[, title]) and one JSONL file
per split (``train.jsonl``, ``dev.jsonl``, ``test.jsonl``) of questions: ``question``,
``answers`` (list) and either ``doc_id`` (the gold document, distractors are drawn
from the same split's documents) or ``passages`` (a fixed list of texts).
The synthetic generator (``regrad_engine.synthetic``) writes this layout.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from regrad_engine.meta import MetaExample


class DataError(ValueError):
    """A data directory or file is missing or malformed; the message says what to fix."""


@dataclass(frozen=True)
class EvalItem:
    """A question with its answers and the k document ids given for it (gold among distractors)."""

    id: str
    question: str
    answers: list[str]
    doc_ids: list[str]
    gold_id: str | None


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number} is not valid JSON ({err.msg})") from err
    return rows


def load_documents(directory: str | Path) -> dict[str, dict]:
    """Documents of ``corpus.jsonl`` by id."""
    docs = {}
    for row in read_jsonl(Path(directory) / "corpus.jsonl"):
        if "id" not in row or "text" not in row:
            raise DataError(f"{directory}/corpus.jsonl: every document needs 'id' and 'text'")
        docs[str(row["id"])] = row
    return docs


def eval_items(directory: str | Path, split: str, *, k: int = 3, seed: int = 0,
               limit: int | None = None) -> list[EvalItem]:
    """Questions of a split with k document ids each: the gold one among k-1 distractors
    drawn from the same split's gold documents, in a seeded random order."""
    all_rows = read_jsonl(Path(directory) / f"{split}.jsonl")
    rows = all_rows[:limit]
    pool = sorted({str(r["doc_id"]) for r in all_rows if "doc_id" in r})
    rng = random.Random(seed)
    items = []
    for i, row in enumerate(rows):
        gold = str(row["doc_id"])
        others = [d for d in pool if d != gold]
        if len(others) < k - 1:
            raise DataError(f"split {split!r} has too few documents for k={k}")
        ids = rng.sample(others, k - 1) + [gold]
        rng.shuffle(ids)
        items.append(EvalItem(id=str(row.get("id", i)), question=row["question"],
                              answers=list(row["answers"]), doc_ids=ids, gold_id=gold))
    return items


def meta_examples(directory: str | Path, split: str, *, k: int = 3, seed: int = 0,
                  limit: int | None = None) -> list[MetaExample]:
    """Meta-learning tasks for a split: each question with its k passages."""
    docs = load_documents(directory)
    rows = read_jsonl(Path(directory) / f"{split}.jsonl")[:limit]
    if rows and "passages" in rows[0]:
        return [MetaExample(r["question"], list(r["answers"]), list(r["passages"])[:k]) for r in rows]
    return [MetaExample(item.question, item.answers, [docs[d]["text"] for d in item.doc_ids])
            for item in eval_items(directory, split, k=k, seed=seed, limit=limit)]
