"""Where answers come from: how often a system's answer is a span of the question's passages, of a
gold passage or only of the distractors, and how often those answers are right.

    python benchmarks/answer_sources.py benchmarks/results/general_given_meta16.json --data runs/general \\
        --out benchmarks/results/answer_sources_meta16.md

Each record of ``regrad eval`` names its k passages: in the given setting the gold passage(s)
among distractors, in the retrieval setting BM25's top k, which may hold no gold passage. A
parametric system never sees the passages, so an answer that is a span of them (and not of
the question) reached the model through the passages' gradients, or through its prior: the
random-gradient and meta-LoRA rows give that prior's rate. "Right" is token F1 >= 0.5 against
the gold answers; matching is on SQuAD-normalised text, whole words. Label sets (PubMedQA) are
left out: 'yes' is a span of most passages.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from regrad_engine.data import DataError, load_documents, read_jsonl  # noqa: E402
from regrad_engine.metrics import answer_key, normalize_answer, token_f1  # noqa: E402

LABEL_SETS = ("pubmedqa",)


def _within(span: str, text: str) -> bool:
    return bool(span) and f" {span} " in f" {text} "


def answer_source(prediction: str, question: str, gold_texts: list[str], other_texts: list[str]) -> str:
    """``"gold"``, ``"distractor"`` (a span of a distractor only), ``"question"`` (a span of the
    question) or ``"none"``."""
    span = answer_key(prediction)
    if not span:
        return "none"
    if _within(span, normalize_answer(question)):
        return "question"
    if any(_within(span, normalize_answer(t)) for t in gold_texts):
        return "gold"
    if any(_within(span, normalize_answer(t)) for t in other_texts):
        return "distractor"
    return "none"


def tabulate(records: list[dict], corpus: dict[str, str], gold_ids: dict[str, list[str]],
             systems: list[str]) -> dict[str, dict[str, dict[str, int]]]:
    """set -> system -> counts of n, gold, gold_right, distractor, question."""
    counts: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for record in records:
        if record["source"] in LABEL_SETS:
            continue
        golds = set(gold_ids[record["id"]])
        gold_texts = [corpus[d] for d in record["documents"] if d in golds]
        other_texts = [corpus[d] for d in record["documents"] if d not in golds]
        for system in systems:
            prediction = record["predictions"].get(system)
            if prediction is None:
                continue
            cell = counts[record["source"]][system]
            cell["n"] += 1
            source = answer_source(prediction, record["question"], gold_texts, other_texts)
            cell[source] += 1
            if source == "gold" and token_f1(prediction, record["answers"]) >= 0.5:
                cell["gold_right"] += 1
    return counts


def markdown(counts, systems: list[str]) -> str:
    lines = ["| set | system | n | span of a gold passage | of those right | span of a distractor only | span of the question |",
             "|---|---|---|---|---|---|---|"]
    for source in sorted(counts):
        for system in systems:
            c = counts[source].get(system)
            if not c:
                continue
            lines.append(f"| {source} | {system} | {c['n']} | {c['gold']} ({c['gold'] / c['n']:.0%}) | "
                         f"{c['gold_right']} | {c['distractor']} ({c['distractor'] / c['n']:.0%}) | {c['question']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_json", help="a `regrad eval` --out file (either setting)")
    p.add_argument("--data", required=True, help="the data directory it was evaluated on (`regrad data --out`)")
    p.add_argument("--systems", default="meta_lora,random_grads,regrad", help="comma-separated")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    try:
        run = json.loads(Path(args.eval_json).read_text(encoding="utf-8"))
        records = run["questions"]
    except (OSError, ValueError, KeyError) as exc:
        sys.exit(f"{args.eval_json} is not a readable `regrad eval` result ({exc})")
    data = Path(args.data)
    split = run.get("split", "test")
    try:
        corpus = {d: row["text"] for d, row in load_documents(data).items()}
        gold_ids = {r["id"]: r["gold_ids"] for r in read_jsonl(data / f"{split}.jsonl")}
    except (DataError, KeyError) as exc:
        sys.exit(f"{data} is not a `regrad data` directory with corpus.jsonl and {split}.jsonl ({exc})")
    missing = [r["id"] for r in records if r["id"] not in gold_ids or any(d not in corpus for d in r["documents"])]
    if missing:
        sys.exit(f"{len(missing)} questions (e.g. {missing[0]!r}) or their passages are not in {data}: "
                 "pass the data directory the evaluation ran on")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    table = markdown(tabulate(records, corpus, gold_ids, systems), systems)
    print(table)
    if args.out:
        header = (f"Answer sources of `{args.eval_json}` (`python benchmarks/answer_sources.py {args.eval_json} "
                  f"--data {args.data} --systems {','.join(systems)}`); right = token F1 >= 0.5.\n\n")
        Path(args.out).write_text(header + table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
