"""The data layer: the document schema, every reader of files on disk, and the QA tasks.

Documents. A *document* is a dict with a string ``"id"``, a non-empty ``"text"`` and any
other keys (``"title"``, ``"url"``, ...) kept as metadata; a :class:`Chunk` is a token-bounded
piece of one (see ``chunking.py``). Chunk ids are ``"<doc_id>"`` when the whole document fits
in one chunk and ``"<doc_id>#<i>"`` otherwise, so document ids must not end with ``#`` and
digits. :func:`read_corpus` reads a corpus (.jsonl, .json, .txt or a directory of them).

QA data. A data directory holds ``corpus.jsonl`` (documents) and one JSONL file per split
(``train.jsonl``, ``dev.jsonl``, ``test.jsonl``) of questions: ``question``, ``answers``
(list) and one of: ``gold_ids`` + ``distractor_ids`` (corpus ids: the gold passage(s) and
ranked hard negatives, as ``regrad data`` writes them), ``doc_id`` (the gold document;
distractors are drawn from the same split's gold documents) or ``passages`` (a fixed list
of texts). An optional ``source`` names the set a question comes from. The generators in
``regrad_engine.datasets`` write this layout.

Every reader here raises :class:`DataError` naming the file and line; a UTF-8 byte-order
mark is accepted.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regrad_engine.errors import CorpusError, DataError
from regrad_engine.files import atomic_write

__all__ = ["Chunk", "CorpusError", "DataError", "EvalItem", "MetaExample", "chunk_source", "eval_items",
           "load_documents", "meta_examples", "normalize_document", "read_corpus", "read_jsonl", "write_jsonl"]

_CHUNK_SUFFIX = re.compile(r"#\d+$")
_CORPUS_SUFFIXES = (".jsonl", ".json", ".txt")


@dataclass(frozen=True)
class Chunk:
    """One token-bounded piece of a source document.

    Attributes:
        id: ``"<doc_id>"`` if the document fits in one chunk, else ``"<doc_id>#<i>"``.
        text: The chunk text, cut out of the original document text.
        source_id: Id of the document the chunk comes from.
        index: Position of the chunk within its source document (from 0).
        metadata: Metadata copied from the source document (e.g. ``title``).
    """

    id: str
    text: str
    source_id: str
    index: int
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MetaExample:
    """One meta-training task: a question, its answers and the k passages given for it."""

    question: str
    answers: list[str]
    passages: list[str]
    source: str = ""


def chunk_source(chunk_id: str) -> str:
    """The source document id of a chunk id: the last ``#<digits>`` suffix is the chunk index
    (``"doc#3"`` -> ``"doc"``, ``"a#b#12"`` -> ``"a#b"``, ``"doc"`` -> ``"doc"``)."""
    return _CHUNK_SUFFIX.sub("", chunk_id)


def normalize_document(doc: Any, where: str) -> dict:
    """Validate one document and return ``{"id", "text", **metadata}`` (a nested ``metadata``
    dict is merged in; an int id becomes a string).

    Raises:
        DataError: The document is not an object or lacks a usable id/text.
    """
    if not isinstance(doc, Mapping):
        raise DataError(f"{where}: expected a JSON object with 'id' and 'text', got {type(doc).__name__}")
    doc_id = doc.get("id")
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise DataError(f"{where}: missing or empty 'id'; give every document a unique string id")
    if _CHUNK_SUFFIX.search(doc_id):
        raise DataError(f"{where}: id {doc_id!r} ends with '#<digits>', which is reserved for chunk indices; rename it")
    text = doc.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where} (id {doc_id!r}): missing or empty 'text'; every document needs a non-empty string 'text'")
    out = {k: v for k, v in doc.items() if k not in ("id", "text", "metadata")}
    if isinstance(doc.get("metadata"), Mapping):
        out.update(doc["metadata"])
    elif "metadata" in doc:
        out["metadata"] = doc["metadata"]
    return {"id": doc_id, "text": text, **out}


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a byte-order mark is dropped)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _jsonl_rows(path: Path) -> list[tuple[Any, str]]:
    """``(object, "file:line")`` for every non-blank line of a JSONL file."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                rows.append((json.loads(line), f"{path}:{lineno}"))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON on line {lineno} ({exc.msg}); each line must be "
                                'one JSON object like {"id": "doc1", "text": "..."}') from exc
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line."""
    rows = []
    for obj, where in _jsonl_rows(Path(path)):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        rows.append(obj)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[Mapping]) -> None:
    """Write rows as JSONL atomically (a temporary file renamed into place)."""
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _read_corpus_file(path: Path, txt_id: str) -> list[tuple[dict, str]]:
    """One corpus file as ``(document, location)`` pairs."""
    suffix = path.suffix.lower()
    if suffix not in _CORPUS_SUFFIXES:
        raise DataError(f"{path}: unsupported corpus file type {suffix!r}; use .jsonl, .json or .txt")
    if suffix == ".jsonl":
        return [(normalize_document(obj, where), where) for obj, where in _jsonl_rows(path)]
    content = read_text(path)
    if suffix == ".txt":
        return [(normalize_document({"id": txt_id, "text": content}, str(path)), str(path))]
    try:
        items = json.loads(content)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from exc
    if not isinstance(items, list):
        raise DataError(f'{path}: expected a JSON list of objects like [{{"id": "doc1", "text": "..."}}]')
    return [(normalize_document(obj, f"{path} item {i}"), f"{path} item {i}") for i, obj in enumerate(items)]


def read_corpus(path: str | Path) -> list[dict]:
    """Documents of a corpus file or directory.

    * ``.jsonl``: one JSON object per line with ``id``, ``text`` and optional other keys;
    * ``.json``: a list of such objects;
    * ``.txt``: the whole file is one document whose id is the file stem;
    * a directory: every ``.txt``/``.jsonl``/``.json`` file inside it (recursively, hidden
      files skipped, sorted by relative path); ``.txt`` ids are the relative path without
      suffix (e.g. ``"guides/setup"``).

    Raises:
        DataError: The path is missing or unreadable, JSON is invalid (the message names the
            file and line), a document lacks ``id``/``text``, or two documents share an id.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"corpus not found: {root}; pass a .jsonl, .json or .txt file or a directory of them")
    if root.is_dir():
        files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _CORPUS_SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                       key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise DataError(f"no .jsonl, .json or .txt files in corpus directory {root}")
        entries = [e for f in files for e in _read_corpus_file(f, f.relative_to(root).with_suffix("").as_posix())]
    else:
        entries = _read_corpus_file(root, root.stem)
    docs: list[dict] = []
    where_by_id: dict[str, str] = {}
    for doc, where in entries:
        if doc["id"] in where_by_id:
            raise DataError(f"{where}: duplicate id {doc['id']!r} (first seen at {where_by_id[doc['id']]}); "
                            "ids must be unique")
        where_by_id[doc["id"]] = where
        docs.append(doc)
    if not docs:
        raise DataError(f"corpus {root} contains no documents")
    return docs


def load_documents(directory: str | Path) -> dict[str, dict]:
    """Documents of a data directory's ``corpus.jsonl`` by id."""
    docs = {}
    for row in read_jsonl(Path(directory) / "corpus.jsonl"):
        if "id" not in row or "text" not in row:
            raise DataError(f"{directory}/corpus.jsonl: every document needs 'id' and 'text'")
        docs[str(row["id"])] = row
    return docs


@dataclass(frozen=True)
class EvalItem:
    """A question with its answers and the k document ids given for it (gold among distractors)."""

    id: str
    question: str
    answers: list[str]
    doc_ids: list[str]
    gold_id: str | None
    source: str = ""


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
            has = "carries its own 'passages'" if "passages" in row else "names no documents"
            raise DataError(f"{directory}/{split}.jsonl: question #{i + 1} {has}; evaluation needs corpus ids: "
                            "'gold_ids' (+ 'distractor_ids') or 'doc_id'")
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
