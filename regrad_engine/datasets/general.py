"""The general meta-training mix: six real QA sets pooled into one data directory.

Sources (read from ``../shared/data``, never copied): SQuAD 2.0 (dev half, answerable
questions), HotpotQA (distractor setting), PopQA, PubMedQA (PQA-L), PolicyQA (dev) and CUAD.
Every source document is cut into passages of at most ``max_words`` words (the bank's
document length: ~120 words is ~160 tokens, under the 200-token chunk size).

Splits are made **by source document group**: a SQuAD article, a PolicyQA policy, a CUAD
contract, a PubMedQA abstract (its test split drawn from the official test questions), a
PopQA subject page, and for HotpotQA the connected groups of questions that share any
paragraph. A group's passages and questions all land in one split, so no test passage or
question is ever seen in training. Each question keeps its gold passage id(s) and the
BM25 top distractors from the pooled passages of its own split (hard negatives; for
open-answer sets a passage that contains an answer is never a distractor).

Layout written (read by :mod:`regrad_engine.data`):
    corpus.jsonl          {"id", "title", "text", "source", "split"}
    train|dev|test.jsonl  {"id", "source", "question", "answers", "gold_ids", "distractor_ids"}
    info.json             counts per source and split, and the settings used
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from regrad_engine.data import read_jsonl, write_jsonl
from regrad_engine.datasets.converters import (
    SPLITS,
    DatasetError,
    clean_text,
    normalized,
    slug,
    source_path,
    cuad_contract_text,
    cuad_items,
    shared_data_dir,
)

SOURCES = ("squad", "hotpotqa", "popqa", "pubmedqa", "policyqa", "cuad")
LABEL_SOURCES = frozenset({"pubmedqa"})  # answers are labels (yes/no/maybe), not spans


@dataclass
class SourceSet:
    """One source read into groups: ``docs[group]`` = [(doc id, title, text)], ``questions[group]``
    = [{"id", "question", "answers", "gold_docs"}] (gold_docs name documents of the group)."""

    name: str
    docs: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    questions: dict[str, list[dict]] = field(default_factory=dict)
    test_groups: set[str] | None = None  # groups that must form the test split (PubMedQA)

    def add_doc(self, group: str, doc_id: str, title: str, text: str) -> None:
        docs = self.docs.setdefault(group, [])
        if all(d[0] != doc_id for d in docs):
            docs.append((doc_id, title, clean_text(text)))

    def add_question(self, group: str, qid: str, question: str, answers: Sequence[str], gold: Sequence[str]) -> None:
        answers = [a for a in dict.fromkeys(clean_text(str(a)) for a in answers) if a]
        if answers and question.strip():
            self.questions.setdefault(group, []).append(
                {"id": f"{self.name}:{qid}", "question": clean_text(question), "answers": answers, "gold_docs": list(gold)})


# --------------------------------------------------------------------------- readers
def _read_squad_format(name: str, *parts: str) -> SourceSet:
    """A SQuAD-format file: one group per article (SQuAD) or policy (PolicyQA), one document
    per paragraph, answerable questions only."""
    data = json.loads(source_path(*parts).read_text(encoding="utf-8"))["data"]
    out = SourceSet(name)
    for article in data:
        group = article["title"]
        for i, paragraph in enumerate(article["paragraphs"]):
            doc_id = f"{name}:{slug(group)}-p{i}"
            out.add_doc(group, doc_id, group.replace("_", " "), paragraph["context"])
            for qa in paragraph["qas"]:
                if not qa.get("is_impossible"):
                    out.add_question(group, qa["id"], qa["question"], [a["text"] for a in qa.get("answers", [])],
                                     [doc_id])
    return out


def read_squad() -> SourceSet:
    return _read_squad_format("squad", "general", "squad2_devhalf", "dev-v2.0.json")


def read_policyqa() -> SourceSet:
    return _read_squad_format("policyqa", "legal", "policyqa", "dev.json")


def read_pubmedqa() -> SourceSet:
    data = json.loads(source_path("medical", "pubmedqa", "ori_pqal.json").read_text(encoding="utf-8"))
    official_test = set(json.loads(source_path("medical", "pubmedqa", "test_ground_truth.json").read_text()))
    out = SourceSet("pubmedqa", test_groups=set())
    for pmid, item in data.items():
        doc_id = f"pubmedqa:{pmid}"
        out.add_doc(pmid, doc_id, f"PMID {pmid}", " ".join(item["CONTEXTS"]))
        out.add_question(pmid, pmid, item["QUESTION"], [item["final_decision"]], [doc_id])
        if pmid in official_test:
            out.test_groups.add(pmid)
    return out


def read_popqa() -> SourceSet:
    """PopQA: the gold passage is the subject's page (it states the answer); the object's
    page (e.g. 'Politician') is shared by many questions and left out."""
    data = json.loads(source_path("general", "popqa1000", "popqa.json").read_text(encoding="utf-8"))
    out = SourceSet("popqa")
    for item in data:
        group = item["s_wiki_title"]
        gold = []
        for paragraph in item["paragraphs"]:
            if paragraph["title"] == group:
                digest = hashlib.sha1(clean_text(paragraph["text"]).encode()).hexdigest()[:8]
                doc_id = f"popqa:{slug(group)}-{digest}"
                out.add_doc(group, doc_id, paragraph["title"], paragraph["text"])
                gold.append(doc_id)
        out.add_question(group, str(item["id"]), item["question"], json.loads(item["possible_answers"]), gold)
    return out


def read_hotpotqa() -> SourceSet:
    """HotpotQA (distractor setting): the 2 supporting paragraphs are gold, the other 8 stay
    in the corpus as passages; questions sharing a paragraph form one group."""
    path = source_path("general", "hotpotqa_dev500", "dev_subsampled.jsonl")
    rows = read_jsonl(path)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for row in rows:
        keys = [f"t:{c['title']}" for c in row["contexts"]]
        for key in keys:
            parent[find(key)] = find(keys[0])
    out = SourceSet("hotpotqa")
    for row in rows:
        group = find(f"t:{row['contexts'][0]['title']}")
        gold = []
        for context in row["contexts"]:
            doc_id = f"hotpotqa:{slug(context['title'])}"
            out.add_doc(group, doc_id, context["title"], context["paragraph_text"])
            if context["is_supporting"]:
                gold.append(doc_id)
        answers = [span for obj in row["answers_objects"] for span in obj.get("spans", [])]
        out.add_question(group, row["question_id"], row["question_text"], answers, gold)
    return out


def read_cuad(*, contract_passages: int = 20) -> SourceSet:
    """CUAD: the annotated clause passages are gold; up to ``contract_passages`` passages of
    the contract's own text (its opening) join the corpus as same-contract distractors."""
    filenames, per_contract = cuad_items()
    out = SourceSet("cuad")
    for index, items in per_contract.items():
        group = f"contract-{index}"
        for doc, qa in items:
            out.add_doc(group, f"cuad:{doc['id']}", doc["title"], doc["text"])
            out.add_question(group, qa["id"], qa["question"], qa["answers"], [f"cuad:{doc['id']}"])
        words = cuad_contract_text(filenames[index]).split()
        title = items[0][0]["title"]
        for j in range(min(contract_passages, len(words) // 120)):
            out.add_doc(group, f"cuad:{index}-text{j}", title, " ".join(words[j * 120:(j + 1) * 120]))
    return out


READERS: dict[str, Callable[[], SourceSet]] = {
    "squad": read_squad, "hotpotqa": read_hotpotqa, "popqa": read_popqa,
    "pubmedqa": read_pubmedqa, "policyqa": read_policyqa, "cuad": read_cuad,
}


# --------------------------------------------------------------------------- passages
def passages(doc_id: str, text: str, max_words: int) -> list[tuple[str, str]]:
    """A document as consecutive passages of at most ``max_words`` words:
    [(id, text)], ids ``doc_id`` (one passage) or ``doc_id~i`` (``#i`` is kept for the
    chunks a store cuts from a document)."""
    words = text.split()
    pieces = [" ".join(words[i:i + max_words]) for i in range(0, max(1, len(words)), max_words)]
    return [(doc_id, pieces[0])] if len(pieces) == 1 else [(f"{doc_id}~{i}", p) for i, p in enumerate(pieces)]


def _holds(text: str, answers: Sequence[str]) -> bool:
    padded = f" {normalized(text)} "
    return any(normalized(a) and f" {normalized(a)} " in padded for a in answers)


def _overlap(question: str, candidates: list[tuple[str, str]]) -> str:
    asked = set(normalized(question).split())
    return max(candidates, key=lambda c: len(asked & set(normalized(c[1]).split())))[0]


def gold_passages(question: dict, pieces: dict[str, list[tuple[str, str]]], labels: bool) -> list[str]:
    """The gold passage of each gold document: the first that holds an answer, else the one
    sharing the most words with the question (a bridge paragraph, a yes/no abstract).
    Open-answer questions need at least one gold passage holding an answer, else []."""
    labels = labels or all(normalized(a) in ("yes", "no", "maybe") for a in question["answers"])
    gold, grounded = [], labels
    for doc_id in question["gold_docs"]:
        candidates = pieces.get(doc_id, [])
        if not candidates:
            continue
        holding = [pid for pid, text in candidates if not labels and _holds(text, question["answers"])]
        grounded = grounded or bool(holding)
        gold.append(holding[0] if holding else _overlap(question["question"], candidates))
    return gold if grounded else []


def resolve(source: SourceSet, max_words: int) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Passages and answerable questions per group: ({group: [passage]}, {group: [question row]})."""
    labels = source.name in LABEL_SOURCES
    group_passages: dict[str, list[dict]] = {}
    group_rows: dict[str, list[dict]] = {}
    for group, docs in source.docs.items():
        pieces = {doc_id: passages(doc_id, text, max_words) for doc_id, _, text in docs}
        group_passages[group] = [{"id": pid, "title": title, "text": ptext, "source": source.name}
                                 for doc_id, title, _ in docs for pid, ptext in pieces[doc_id]]
        for question in source.questions.get(group, []):
            gold = gold_passages(question, pieces, labels)
            if gold:
                group_rows.setdefault(group, []).append(
                    {"id": question["id"], "source": source.name, "question": question["question"],
                     "answers": question["answers"], "gold_ids": gold})
    return group_passages, group_rows


# --------------------------------------------------------------------------- the mix
def assign_groups(source: SourceSet, group_rows: dict[str, list[dict]], *, test_questions: int,
                  dev_questions: int, seed: int) -> dict[str, str]:
    """Group -> split. Test (then dev) takes whole groups, seeded, until it has the asked
    number of questions; every other group is train. PubMedQA's test groups are the official
    test questions'; those not sampled are ``unused`` (their passages join the test corpus)."""
    groups = sorted(group_rows)
    random.Random(f"{seed}:{source.name}").shuffle(groups)
    if source.test_groups is not None:
        groups.sort(key=lambda g: g not in source.test_groups)  # official test first, order kept
    assigned: dict[str, str] = {}
    counts = {"test": 0, "dev": 0}
    for group in groups:
        allowed = source.test_groups is None or group in source.test_groups
        if allowed and counts["test"] < test_questions:
            split = "test"
        elif counts["dev"] < dev_questions and (source.test_groups is None or group not in source.test_groups):
            split = "dev"
        elif source.test_groups is not None and group in source.test_groups:
            split = "unused"  # official test beyond what we sample: never trained on
        else:
            split = "train"
        assigned[group] = split
        if split in counts:
            counts[split] += len(group_rows[group])
    for group in source.docs:  # groups with passages but no question: distractors of train
        assigned.setdefault(group, "train")
    return assigned


def build_general(out_dir: str | Path, *, sources: Sequence[str] = SOURCES, max_words: int = 120,
                  test_questions: int = 200, dev_questions: int = 50, train_questions: int = 1000,
                  distractors: int = 4, synthetic_share: float = 0.0, seed: int = 0,
                  log: Callable[[str], None] = print) -> dict:
    """Write the pooled meta-training directory (see the module docstring); returns info.json.

    Args:
        out_dir: Directory to write.
        sources: Which of :data:`SOURCES` to pool.
        max_words: Words per passage.
        test_questions, dev_questions, train_questions: Questions per source and split (at most;
            test and dev take whole groups, then a seeded sample is kept).
        distractors: BM25 hard negatives stored per question (k - gold are used).
        synthetic_share: Share of the train questions taken from the synthetic corpus
            (``regrad synth``), e.g. 0.1; 0 for none.
        seed: Split and sampling seed.
    """
    unknown = [s for s in sources if s not in READERS]
    if unknown:
        raise DatasetError(f"unknown source {unknown[0]!r}: choose from {', '.join(SOURCES)}")
    if not 0 <= synthetic_share < 1:
        raise DatasetError(f"synthetic_share must be in [0, 1), got {synthetic_share}")
    for name, value in (("max_words", max_words), ("test_questions", test_questions),
                        ("dev_questions", dev_questions), ("train_questions", train_questions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DatasetError(f"{name} (--{name.replace('_', '-')}) must be a positive integer, got {value!r}")
    if not shared_data_dir().is_dir():
        raise DatasetError(f"{shared_data_dir()} not found: put the shared data beside the checkout "
                           "or set REGRAD_SHARED_DATA")
    corpus: list[dict] = []
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    info: dict = {"settings": {"sources": list(sources), "max_words": max_words, "test_questions": test_questions,
                               "dev_questions": dev_questions, "train_questions": train_questions,
                               "distractors": distractors, "synthetic_share": synthetic_share, "seed": seed},
                  "sources": {}}
    for name in sources:
        source = READERS[name]()
        group_passages, group_rows = resolve(source, max_words)
        split_of = assign_groups(source, group_rows, test_questions=test_questions, dev_questions=dev_questions,
                                 seed=seed)
        kept = _split_rows(name, split_of, group_passages, group_rows, corpus, rows, seed=seed,
                           caps={"train": train_questions, "dev": dev_questions, "test": test_questions})
        info["sources"][name] = kept
        log(f"{name}: " + ", ".join(f"{s} {kept[s]} questions" for s in SPLITS))
    info["dropped_repeated_questions"] = _drop_repeated_questions(rows)
    if synthetic_share > 0:
        info["sources"]["synthetic"] = _add_synthetic(corpus, rows, synthetic_share, seed)
    _add_distractors(corpus, rows, distractors, seed)
    for split in SPLITS:
        random.Random(f"{seed}:order:{split}").shuffle(rows[split])
    info["passages"] = {s: sum(1 for d in corpus if d["split"] == s) for s in SPLITS}
    _write(Path(out_dir), corpus, rows, info)
    log(f"wrote {len(corpus)} passages ({info['passages']}) and "
        f"{', '.join(f'{len(rows[s])} {s}' for s in SPLITS)} questions to {out_dir}")
    return info


def _split_rows(name: str, split_of: dict[str, str], group_passages: dict[str, list[dict]],
                group_rows: dict[str, list[dict]], corpus: list[dict], rows: dict[str, list[dict]], *,
                seed: int, caps: dict[str, int]) -> dict[str, int]:
    taken: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for group, found in group_passages.items():
        split = split_of[group]
        corpus += [{**p, "split": "test" if split == "unused" else split} for p in found]
        if split in SPLITS:
            taken[split] += group_rows.get(group, [])
    for split in SPLITS:
        sample = taken[split]
        if len(sample) > caps[split]:
            sample = random.Random(f"{seed}:{name}:{split}").sample(sample, caps[split])
        rows[split] += sample
    return {s: min(len(taken[s]), caps[s]) for s in SPLITS}


def _drop_repeated_questions(rows: dict[str, list[dict]]) -> dict[str, int]:
    """Drop train (dev) questions whose wording is also a later split's (PolicyQA reuses
    questions across policies): no test question is ever trained on."""
    dropped = {}
    later: set[str] = set()
    for split in ("test", "dev", "train"):
        before = len(rows[split])
        if split != "test":
            rows[split] = [r for r in rows[split] if normalized(r["question"]) not in later]
        dropped[split] = before - len(rows[split])
        later |= {normalized(r["question"]) for r in rows[split]}
    return dropped


def _add_synthetic(corpus: list[dict], rows: dict[str, list[dict]], share: float, seed: int) -> dict[str, int]:
    """Mix synthetic train/dev questions (fictional entities) in at ``share`` of each split."""
    from regrad_engine.datasets.synthetic import generate_corpus

    synth = generate_corpus(600, seed=seed)
    kept = {"train": 0, "dev": 0, "test": 0}
    for split in ("train", "dev"):
        want = round(len(rows[split]) * share / (1 - share))
        pairs = synth.split(split)[:want]
        docs = synth.documents_by_id()
        for doc_id in sorted({p.doc_id for p in pairs}):
            corpus.append({"id": f"synthetic:{doc_id}", "title": docs[doc_id].get("title", ""),
                           "text": docs[doc_id]["text"], "source": "synthetic", "split": split})
        rows[split] += [{"id": f"synthetic:{split}-{i}", "source": "synthetic", "question": p.question,
                         "answers": list(p.answers), "gold_ids": [f"synthetic:{p.doc_id}"]}
                        for i, p in enumerate(pairs)]
        kept[split] = len(pairs)
    return kept


def _add_distractors(corpus: list[dict], rows: dict[str, list[dict]], n: int, seed: int) -> None:
    """BM25 top passages of the same split that are neither gold nor hold an answer; topped
    up with random passages of the split when BM25 finds too few (seeded)."""
    from regrad_engine.retrieval import BM25Index

    for split in SPLITS:
        if not rows[split]:
            continue
        docs = [d for d in corpus if d["split"] == split]
        text = {d["id"]: d["text"] for d in docs}
        with tempfile.TemporaryDirectory() as tmp:
            index = BM25Index.create(Path(tmp) / "bm25")
            index.add([{"id": d["id"], "text": f"{d['title']} {d['text']}"} for d in docs])
            hits = index.retrieve_batch([r["question"] for r in rows[split]], 10 * n + 10)
        rng = random.Random(f"{seed}:distractors:{split}")
        for row, found in zip(rows[split], hits):
            gold = set(row["gold_ids"])
            answers = [] if row["source"] in LABEL_SOURCES else row["answers"]

            def usable(doc_id: str) -> bool:
                return doc_id not in gold and not _holds(text[doc_id], answers)

            chosen = [h.id for h in found if usable(h.id)][:n]
            for _ in range(100 * n):  # bounded: a tiny split may hold too few usable passages
                if len(chosen) == n:
                    break
                candidate = docs[rng.randrange(len(docs))]["id"]
                if candidate not in chosen and usable(candidate):
                    chosen.append(candidate)
            row["distractor_ids"] = chosen


def _write(out: Path, corpus: list[dict], rows: dict[str, list[dict]], info: dict) -> None:
    ids = [d["id"] for d in corpus]
    if len(ids) != len(set(ids)):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"duplicate passage id {dup!r}")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "corpus.jsonl", corpus)
    for split in SPLITS:
        write_jsonl(out / f"{split}.jsonl", rows[split])
    (out / "info.json").write_text(json.dumps(info, indent=1))
