"""QA data on disk, turned into meta-learning tasks and evaluation sets.

A data directory holds ``corpus.jsonl`` (documents: id, text[, title]) and one JSONL file
per split (``train.jsonl``, ``dev.jsonl``, ``test.jsonl``) of questions: ``question``,
``answers`` (list) and one of: ``gold_ids`` + ``distractor_ids`` (corpus ids: the gold
passage(s) and ranked hard negatives, as ``regrad data`` writes them), ``doc_id`` (the gold
document; distractors are drawn from the same split's gold documents) or ``passages`` (a
fixed list of texts). An optional ``source`` names the set a question comes from.
The synthetic generator (``regrad_engine.datasets.synthetic``) writes this layout.
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
    source: str = ""


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
    """Questions of a split with k document ids each, gold among distractors, in a seeded
    random order. Rows with ``gold_ids`` use their own ranked distractors; rows with only
    ``doc_id`` draw k-1 distractors from the split's gold documents. ``limit`` keeps the
    first N questions of each source."""
    all_rows = read_jsonl(Path(directory) / f"{split}.jsonl")
    rows = _first_per_source(all_rows, limit)
    pool = sorted({str(r["doc_id"]) for r in all_rows if "doc_id" in r})
    rng = random.Random(seed)
    items = []
    for i, row in enumerate(rows):
        for key in ("question", "answers"):
            if key not in row:
                raise DataError(f"{directory}/{split}.jsonl: question #{i + 1} has no {key!r}")
        if "gold_ids" in row:
            golds = [str(d) for d in row["gold_ids"]][:k]
            ids = golds + [str(d) for d in row.get("distractor_ids", []) if str(d) not in golds][:k - len(golds)]
        elif "doc_id" in row:
            golds = [str(row["doc_id"])]
            others = [d for d in pool if d != golds[0]]
            if len(others) < k - 1:
                raise DataError(f"split {split!r} has too few documents for k={k}")
            ids = rng.sample(others, k - 1) + golds
        else:
            raise DataError(f"{directory}/{split}.jsonl: question #{i + 1} names no documents "
                            "(needs 'gold_ids', 'doc_id' or 'passages')")
        rng.shuffle(ids)
        items.append(EvalItem(id=str(row.get("id", i)), question=row["question"], answers=list(row["answers"]),
                              doc_ids=ids, gold_id=golds[0], source=str(row.get("source", ""))))
    return items


def _first_per_source(rows: list[dict], limit: int | None) -> list[dict]:
    if limit is None:
        return rows
    seen: dict[str, int] = {}
    kept = []
    for row in rows:
        source = str(row.get("source", ""))
        if seen.get(source, 0) < limit:
            seen[source] = seen.get(source, 0) + 1
            kept.append(row)
    return kept


def meta_examples(directory: str | Path, split: str, *, k: int = 3, seed: int = 0,
                  limit: int | None = None) -> list[MetaExample]:
    """Meta-learning tasks for a split: each question with its k passages (rows with their
    own ``passages`` use them; every other row names corpus documents)."""
    rows = _first_per_source(read_jsonl(Path(directory) / f"{split}.jsonl"), limit)
    fixed = [r for r in rows if "passages" in r]
    if fixed and len(fixed) < len(rows):
        raise DataError(f"{directory}/{split}.jsonl mixes rows with 'passages' and rows without: use one form")
    if fixed:
        return [MetaExample(r["question"], list(r["answers"]), list(r["passages"])[:k], str(r.get("source", "")))
                for r in rows]
    docs = load_documents(directory)
    items = eval_items(directory, split, k=k, seed=seed, limit=limit)
    missing = sorted({d for item in items for d in item.doc_ids if d not in docs})
    if missing:
        raise DataError(f"{directory}/{split}.jsonl names documents not in corpus.jsonl, e.g. {missing[0]!r}")
    return [MetaExample(item.question, item.answers, [docs[d]["text"] for d in item.doc_ids], item.source)
            for item in items]
