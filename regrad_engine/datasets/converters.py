"""Real QA data sets as regrad data directories (for the example bots and domain meta-training).

A regrad data directory holds ``corpus.jsonl`` (documents: ``id``, ``text``, ``title``; here
also ``split``, the split the document belongs to) and ``train.jsonl`` / ``dev.jsonl`` /
``test.jsonl`` (questions: ``id``, ``question``, ``answers`` and ``doc_id``, the gold
document). Splits are made *by document* (PubMedQA abstract, CUAD contract, PolicyQA
policy), seeded, so a document never appears in two splits and the test split is held out.

The source files are read from ``../shared/data`` next to the repository (override with
``REGRAD_SHARED_DATA``); they are never copied into this repository. Licences: PubMedQA MIT,
CUAD v1 CC BY 4.0, PolicyQA MIT (see examples/README.md).

    python examples/datasets.py pubmedqa --out runs/examples/medical/data
    python examples/datasets.py legal    --out runs/examples/legal/data/legal   # CUAD + PolicyQA

The pooled meta-training mix of all six sets is :mod:`regrad_engine.datasets.general`
(``regrad data``).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from regrad_engine.data import read_jsonl, write_jsonl
from regrad_engine.errors import DatasetError

SPLITS = ("train", "dev", "test")

CUAD_CATEGORIES = ("Governing Law", "Parties", "Expiration Date", "Effective Date", "Agreement Date")
CUAD_QUESTIONS = {
    "Governing Law": "Which law governs the {name}?",
    "Parties": "Who are the parties to the {name}?",
    "Expiration Date": "When does the {name} expire?",
    "Effective Date": "What is the effective date of the {name}?",
    "Agreement Date": "On what date was the {name} made?",
}
DATE_CATEGORIES = {"Expiration Date", "Effective Date", "Agreement Date", "Renewal Term"}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def shared_data_dir() -> Path:
    """``$REGRAD_SHARED_DATA``, else ``../shared/data`` beside the source checkout, else beside
    the current directory."""
    env = os.environ.get("REGRAD_SHARED_DATA")
    if env:
        return Path(env)
    beside_checkout = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return beside_checkout if beside_checkout.is_dir() else Path.cwd().parent / "shared" / "data"


def source_path(*parts: str) -> Path:
    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        raise DatasetError(f"{path} not found: the examples read the shared data set from ../shared/data "
                           "(or set REGRAD_SHARED_DATA to its folder)")
    return path


def clean_text(text: str) -> str:
    return " ".join(text.split())


def _cut(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters, cut at a word boundary."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip(" ,;:") + " ..."


def normalized(text: str) -> str:
    """Lowercase alphanumerics only, single-spaced (for 'is the answer in the document' checks)."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def write_data_dir(out_dir: str | Path, documents: Sequence[dict], splits: dict[str, list[dict]]) -> dict[str, int]:
    """Write ``corpus.jsonl`` and one JSONL file per split; returns the counts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [d["id"] for d in documents]
    if len(ids) != len(set(ids)):
        raise DatasetError("duplicate document ids")
    known = set(ids)
    for split, rows in splits.items():
        missing = [r["doc_id"] for r in rows if r["doc_id"] not in known]
        if missing:
            raise DatasetError(f"{split}: questions about unknown documents, e.g. {missing[0]!r}")
    write_jsonl(out / "corpus.jsonl", documents)
    for split in SPLITS:
        write_jsonl(out / f"{split}.jsonl", splits.get(split, []))
    counts = {"documents": len(documents)}
    for split in SPLITS:
        rows = splits.get(split, [])
        counts[f"{split}_questions"] = len(rows)
        counts[f"{split}_documents"] = sum(1 for d in documents if d.get("split") == split)
    return counts


def split_documents(out_dir: str | Path, split: str) -> list[dict]:
    """The documents of one split of a data directory written here (``split`` field)."""
    return [r for r in read_jsonl(Path(out_dir) / "corpus.jsonl") if r.get("split") == split]


# --------------------------------------------------------------------------- PubMedQA
def pubmedqa(out_dir: str | Path, *, train: int = 300, dev: int = 50, test: int = 100, seed: int = 0) -> dict[str, int]:
    """PubMedQA PQA-L: one document per question (its abstract without the conclusion), answer
    yes / no / maybe. Test = a seeded sample of ``test`` ids of the official test split
    (``test_ground_truth.json``, which lists its ids sorted by label: its first 100 are all
    "yes"); train and dev are drawn (seeded) from the other 500."""
    data = json.loads(source_path("medical", "pubmedqa", "ori_pqal.json").read_text(encoding="utf-8"))
    official_test = list(json.loads(source_path("medical", "pubmedqa", "test_ground_truth.json").read_text()))
    rest = sorted(pmid for pmid in data if pmid not in set(official_test))
    random.Random(seed).shuffle(rest)
    if test > len(official_test) or train + dev > len(rest):
        raise DatasetError(f"PubMedQA has {len(official_test)} test and {len(rest)} other questions")
    test_ids = sorted(random.Random(seed + 1).sample(sorted(official_test), test))
    chosen = {"train": rest[:train], "dev": rest[train:train + dev], "test": test_ids}
    documents, splits = [], {}
    for split, pmids in chosen.items():
        splits[split] = []
        for pmid in pmids:
            item = data[pmid]
            contexts = item["CONTEXTS"]
            if isinstance(contexts, str):  # stored as a Python list literal in some copies
                contexts = ast.literal_eval(contexts)
            documents.append({"id": pmid, "title": f"PMID {pmid}", "text": clean_text(" ".join(contexts)), "split": split})
            splits[split].append({"id": pmid, "question": clean_text(item["QUESTION"]),
                                  "answers": [item["final_decision"]], "doc_id": pmid})
    return write_data_dir(out_dir, documents, splits)


# --------------------------------------------------------------------------- CUAD
def _spans(cell: str) -> list[str]:
    """A master_clauses.csv clause cell (a Python list literal of strings) as clean spans."""
    cell = cell.strip()
    if not cell:
        return []
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        value = [cell]
    if isinstance(value, str):
        value = [value]
    spans = []
    for span in value:
        span = clean_text(str(span).replace("<omitted>", " ... "))
        if span and span not in spans:
            spans.append(span)
    return spans


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


_COMPANY_SUFFIX = re.compile(r"(,?\s*(INC|CORP|CORPORATION|LLC|LP|LTD|PLC|CO|COM|NV|SA|AG|GROUP))+\.?$", re.I)


def _company(raw: str) -> str:
    """'CybergyHoldingsInc' -> 'Cybergy Holdings', 'ADAMSGOLFINC' -> 'Adamsgolf'."""
    raw = raw.strip().strip(".")
    if any(c.islower() for c in raw):
        words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", raw).replace(",", " ").split()
        while len(words) > 1 and words[-1].lower().strip(".") in ("inc", "corp", "llc", "lp", "ltd", "plc", "co", "com"):
            words.pop()
        return " ".join(words)
    name = _COMPANY_SUFFIX.sub("", raw) or raw
    name = name.replace(",", " ").strip()
    return " ".join(w.capitalize() if w.isalpha() else w.title() for w in name.split())


def cuad_contract_name(filename: str) -> str:
    """A readable short name from a CUAD file name, e.g.
    'CybergyHoldingsInc_20140520_10-Q_EX-10.27_8605784_EX-10.27_Affiliate Agreement.pdf'
    -> 'Cybergy Holdings affiliate agreement'."""
    stem = re.sub(r"\.(pdf|PDF|txt)$", "", filename).strip()
    if " - " in stem:
        company, kind = stem.split(" - ", 1)
    elif re.match(r"^[^_]+_\d{8}_", stem):  # CamelCase_YYYYMMDD_form_EX-..._Kind
        company, kind = stem.split("_", 1)[0], stem.rsplit("_", 1)[-1]
    else:  # COMPANY_MM_DD_YYYY-EX-10.1-KIND
        company = stem.split("_", 1)[0]
        kind = re.split(r"-EX-[^-]*-", stem, maxsplit=1)[-1] if "-EX-" in stem else stem
    kind = re.sub(r"\s*\(.*?\)\s*", " ", kind.replace("_", " "))
    kind = re.sub(r"\s*part\s*\d+$|\d+$", "", kind.strip(), flags=re.I).strip(" .,-")
    words = kind.split()
    if len(words) > 6 and "agreement" in [w.lower() for w in words]:  # '... Agreement with the BISYS Group'
        words = words[:[w.lower() for w in words].index("agreement") + 1]
    kind = " ".join(words[:6]).lower() or "agreement"
    return f"{_company(company)} {kind}".strip()


def _long_date(short: str) -> list[str]:
    """'5/8/14' -> ['May 8, 2014', '8 May 2014'] (CUAD writes dates as m/d/yy)."""
    match = re.fullmatch(r"(\d{1,2})/(\d{1,2})/(\d{2}|\d{4})", short.strip())
    if not match:
        return []
    month, day, year = int(match[1]), int(match[2]), match[3]
    if not 1 <= month <= 12 or not 1 <= day <= 31:
        return []
    year = int(year) if len(year) == 4 else (2000 + int(year) if int(year) <= 30 else 1900 + int(year))
    return [f"{MONTHS[month - 1]} {day}, {year}", f"{day} {MONTHS[month - 1]} {year}"]


def _cuad_answers(category: str, answer_cell: str, spans: list[str]) -> list[str]:
    """The answer column's value(s), split; dates also in words; redacted or unknown dropped."""
    cell = answer_cell.strip()
    if not cell:
        return []
    if cell.startswith("[") and cell.endswith("]"):
        values = _spans(cell)
    else:
        values = re.split(r"\s*(?:;|\n)\s*", cell)
    answers: list[str] = []
    for value in values:
        if category == "Parties":
            value = re.sub(r"\([^)]*\)", " ", value)  # drop the defined terms ("Company")
        value = clean_text(value).strip(" ,;(").rstrip(")")
        if not value or "[" in value or "*" in value or len(value) > 80:
            continue
        answers.append(value)
        if category in DATE_CATEGORIES:
            answers += _long_date(value)
    if category in DATE_CATEGORIES and answers:  # the annotated date spans as they are written
        answers += [s.strip(" ,(") for s in spans if len(s) <= 40 and re.search(r"\d", s) and "[" not in s]
    unique: list[str] = []
    for a in answers:
        if a and a not in unique:
            unique.append(a)
    return unique


def _contract_window(contract_text: str, spans: list[str], max_chars: int) -> str | None:
    """A passage of the contract around the earliest annotated span (for span-only categories)."""
    text = clean_text(contract_text)
    found = [pos for pos in (text.find(span[:60]) for span in spans) if pos >= 0]
    if not found:
        return None
    start = max(0, min(found) - max_chars // 5)  # the earliest mention, near the passage's start
    if start:
        start = text.find(" ", start) + 1
    return _cut(text[start:], max_chars)


def cuad_contract_text(filename: str) -> str:
    """The full text of a CUAD contract by its ``master_clauses.csv`` file name ('' if absent)."""
    txt = source_path("legal", "cuad", "master_clauses.csv").parent / "full_contract_txt" / (
        re.sub(r"\.(pdf|PDF)$", "", filename) + ".txt")
    return txt.read_text(encoding="utf-8", errors="replace") if txt.exists() else ""


def cuad_items(*, categories: Sequence[str] = CUAD_CATEGORIES, max_chars: int = 1000,
               grounded: bool = True) -> tuple[list[str], dict[int, list[tuple[dict, dict]]]]:
    """CUAD v1 as (contract file names, {contract index: [(document, question), ...]}).

    For every contract and category with an annotated clause and answer: a document (the
    clause, prefixed with the contract's name; span-only annotations such as party names or
    dates get a passage of the contract around the span) and a question built from the
    category and the contract's short name. With ``grounded`` a question is kept only if one
    of its answers is in its document."""
    path = source_path("legal", "cuad", "master_clauses.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    unknown = [c for c in categories if c not in rows[0] or f"{c}-Answer" not in rows[0]]
    if unknown:
        raise DatasetError(f"no CUAD category {unknown[0]!r} in {path}")
    names: dict[int, str] = {}
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        name = cuad_contract_name(row["Filename"])
        seen[name.lower()] = seen.get(name.lower(), 0) + 1
        names[index] = name if seen[name.lower()] == 1 else f"{name} no. {seen[name.lower()]}"
    per_contract: dict[int, list[tuple[dict, dict]]] = {}
    for index, row in enumerate(rows):
        contract_text = None
        for category in categories:
            spans = _spans(row[category])
            answers = _cuad_answers(category, row[f"{category}-Answer"], spans)
            if not spans or not answers:
                continue
            clause = " ... ".join(spans)
            if category == "Parties" or max(len(s) for s in spans) < 80:
                # names or dates, not a clause, were annotated: use the contract's passage around them
                if contract_text is None:
                    contract_text = cuad_contract_text(row["Filename"])
                clause = _contract_window(contract_text, spans, max_chars) or clause
            name = names[index]
            title = name[0].upper() + name[1:]
            text = _cut(f"{title} ({category}): {clause}", max_chars)
            if grounded and not any(normalized(a) and normalized(a) in normalized(text) for a in answers):
                continue
            doc_id = f"{index}-{slug(category)}"
            doc = {"id": doc_id, "title": title, "text": text}
            qa = {"id": doc_id, "question": CUAD_QUESTIONS.get(category, f"What is the {category.lower()} of the {{name}}?")
                  .format(name=name), "answers": answers, "doc_id": doc_id}
            per_contract.setdefault(index, []).append((doc, qa))
    return [row["Filename"] for row in rows], per_contract


def cuad(out_dir: str | Path, *, categories: Sequence[str] = CUAD_CATEGORIES, dev: int = 40, test: int = 80,
         seed: int = 0, max_chars: int = 1000, grounded: bool = True) -> dict[str, int]:
    """CUAD v1 (see :func:`cuad_items`), split by contract: ``test`` and ``dev`` contracts
    (seeded), the rest train."""
    _, per_contract = cuad_items(categories=categories, max_chars=max_chars, grounded=grounded)
    contracts = sorted(per_contract)
    random.Random(seed).shuffle(contracts)
    if dev + test >= len(contracts):
        raise DatasetError(f"CUAD has {len(contracts)} usable contracts, fewer than dev + test + 1")
    assigned = {"test": contracts[:test], "dev": contracts[test:test + dev], "train": contracts[test + dev:]}
    documents, splits = [], {}
    for split in SPLITS:
        splits[split] = []
        for index in assigned[split]:
            for doc, qa in per_contract[index]:
                documents.append({**doc, "split": split})
                splits[split].append(qa)
    return write_data_dir(out_dir, documents, splits)


# --------------------------------------------------------------------------- PolicyQA
def policyqa(out_dir: str | Path, *, policies: tuple[int, int, int] = (14, 2, 4),
             max_questions: tuple[int, int, int] = (600, 60, 150), seed: int = 0) -> dict[str, int]:
    """PolicyQA (dev file, SQuAD format): documents = policy paragraphs (id ``<policy>-p<i>``,
    title = the policy), questions with their answer spans. Split by policy
    (train/dev/test counts in ``policies``, seeded); at most ``max_questions`` per split,
    a seeded sample."""
    data = json.loads(source_path("legal", "policyqa", "dev.json").read_text(encoding="utf-8"))["data"]
    if sum(policies) > len(data):
        raise DatasetError(f"PolicyQA has {len(data)} policies, asked for {sum(policies)}")
    order = sorted(range(len(data)), key=lambda i: data[i]["title"])
    random.Random(seed).shuffle(order)
    n_train, n_dev, _ = policies
    ranges = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev],
              "test": order[n_train + n_dev:sum(policies)]}
    documents, splits = [], {}
    for split_number, split in enumerate(SPLITS):
        questions = []
        for p in sorted(ranges[split], key=lambda i: data[i]["title"]):
            policy = data[p]
            for i, paragraph in enumerate(policy["paragraphs"]):
                doc_id = f"{policy['title']}-p{i}"
                documents.append({"id": doc_id, "title": policy["title"], "text": clean_text(paragraph["context"]),
                                  "split": split})
                for qa in paragraph["qas"]:
                    answers = []
                    for answer in qa.get("answers", []):
                        text = clean_text(answer["text"])
                        if text and text not in answers:
                            answers.append(text)
                    if answers and qa["question"].strip():
                        questions.append({"id": qa["id"], "question": clean_text(qa["question"]),
                                          "answers": answers, "doc_id": doc_id})
        random.Random(seed * 1000 + split_number).shuffle(questions)
        splits[split] = questions[:max_questions[split_number]]
    return write_data_dir(out_dir, documents, splits)


# --------------------------------------------------------------------------- both legal sets
def legal(out_dir: str | Path, *, seed: int = 0) -> dict[str, int]:
    """CUAD + PolicyQA in one data directory (for meta-training the legal checkpoint); each
    split's questions interleaved (seeded)."""
    import tempfile

    documents: list[dict] = []
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("cuad", cuad), ("policyqa", policyqa)):
            make(Path(tmp) / name, seed=seed)
            documents += [{**row, "source": name} for row in read_jsonl(Path(tmp) / name / "corpus.jsonl")]
            for split in SPLITS:
                splits[split] += read_jsonl(Path(tmp) / name / f"{split}.jsonl")
    for number, split in enumerate(SPLITS):
        random.Random(seed * 1000 + number).shuffle(splits[split])
    return write_data_dir(out_dir, documents, splits)


BUILDERS = {"pubmedqa": pubmedqa, "cuad": cuad, "policyqa": policyqa, "legal": legal}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a regrad data directory from ../shared/data.")
    parser.add_argument("dataset", choices=sorted(BUILDERS))
    parser.add_argument("--out", required=True, help="data directory to write")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    args = parser.parse_args(argv)
    try:
        counts = BUILDERS[args.dataset](args.out, seed=args.seed)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.dataset} -> {args.out}: {counts['documents']} documents; " + ", ".join(
        f"{s} {counts[f'{s}_questions']} questions / {counts[f'{s}_documents']} documents" for s in SPLITS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
