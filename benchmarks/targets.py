"""Check the real-question targets (issue: real knowledge through gradients) against
`regrad eval --out` JSON files, and print one line per target per set.

    python benchmarks/targets.py --given benchmarks/results/general_given_cpu.json \
        [--given another_given_run.json] --retrieval benchmarks/results/general_retrieval_cpu.json

Targets (F1 = token F1, EM = exact match, both means over the set's questions):
    parametric > random   ReGrad parametric F1 >= random passages' gradients F1 + 0.10 (open-answer sets)
    hybrid > RAG          ReGrad hybrid F1 >= RAG F1 + 0.05, and >= the format control's F1 (every set)
    labels                PubMedQA: ReGrad EM above the majority answer, its 95% interval excluding it
    no collapse           no system's most frequent answer covers more than 50% of an open-answer set
    retrieval             ReGrad hybrid F1 >= RAG F1 in the retrieval setting (every set)

Where the JSON holds the per-question answers, each gap also gets its paired 95% bootstrap
interval (the same questions resampled for both systems): a gap whose interval holds 0 is not
shown to be real at this number of questions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from regrad_engine.metrics import bootstrap_interval, token_f1  # noqa: E402

LABEL_SETS = {"pubmedqa"}
COLLAPSE = "no top answer over 50%"


def _f1(entry: dict, system: str) -> float:
    return entry["systems"][system]["f1"]["mean"]


def paired_gap(questions: Sequence[dict], source: str, first: str, second: str, metric=token_f1) -> str:
    """`` [low, high]``: the paired 95% bootstrap interval of metric(first) - metric(second) over
    the set's questions (token F1 unless told), or "" when the per-question answers are not in the file."""
    rows = [q for q in questions  # the report names a set without a source "all"
            if (q["source"] or "all") == source and {first, second} <= q["predictions"].keys()]
    if not rows:
        return ""
    gaps = [metric(q["predictions"][first], q["answers"]) - metric(q["predictions"][second], q["answers"])
            for q in rows]
    low, high = bootstrap_interval(gaps)
    return f" [{low:+.3f}, {high:+.3f}]"


def check_given(report: dict[str, dict], questions: Sequence[dict] = ()) -> list[tuple[str, str, bool, str]]:
    rows = []
    for name, entry in report.items():
        systems = entry["systems"]
        if name not in LABEL_SETS and {"regrad", "random_grads"} <= set(systems):
            gap = _f1(entry, "regrad") - _f1(entry, "random_grads")
            rows.append((name, "parametric F1 >= random + 0.10", gap >= 0.10,
                         f"{_f1(entry, 'regrad'):.3f} vs {_f1(entry, 'random_grads'):.3f} "
                         f"({gap:+.3f}{paired_gap(questions, name, 'regrad', 'random_grads')})"))
        if {"regrad_hybrid", "rag", "format_control"} <= set(systems):
            hybrid, rag, control = (_f1(entry, s) for s in ("regrad_hybrid", "rag", "format_control"))
            rows.append((name, "hybrid F1 >= RAG + 0.05 and >= format control",
                         hybrid >= rag + 0.05 and hybrid >= control,
                         f"hybrid {hybrid:.3f}, RAG {rag:.3f} ({hybrid - rag:+.3f}"
                         f"{paired_gap(questions, name, 'regrad_hybrid', 'rag')}), format control {control:.3f} "
                         f"({hybrid - control:+.3f}{paired_gap(questions, name, 'regrad_hybrid', 'format_control')})"))
        if name in LABEL_SETS and "regrad" in systems:
            em = systems["regrad"]["exact_match"]
            rows.append((name, "EM above majority, interval excludes it", em["low"] > entry["majority_share"],
                         f"ReGrad EM {em['mean']:.3f} [{em['low']:.2f}, {em['high']:.2f}] vs majority "
                         f"{entry['majority_share']:.3f}"))
        if name not in LABEL_SETS:
            worst = max((s for s in systems if s != "majority"), key=lambda s: systems[s]["top_answer_share"])
            share = systems[worst]["top_answer_share"]
            rows.append((name, COLLAPSE, share <= 0.5,
                         f"highest: {worst} {share:.2f} ({systems[worst]['top_answer']!r})"))
    return rows


def check_retrieval(report: dict[str, dict], questions: Sequence[dict] = ()) -> list[tuple[str, str, bool, str]]:
    rows = []
    for name, entry in report.items():
        if {"regrad_hybrid", "rag"} <= set(entry["systems"]):
            hybrid, rag = _f1(entry, "regrad_hybrid"), _f1(entry, "rag")
            rows.append((name, "retrieval: hybrid F1 >= RAG", hybrid >= rag,
                         f"hybrid {hybrid:.3f}, RAG {rag:.3f} ({hybrid - rag:+.3f}"
                         f"{paired_gap(questions, name, 'regrad_hybrid', 'rag')}; gold in top-k "
                         f"{entry['gold_recall']:.0%})"))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--given", action="append", default=[],
                        help="regrad eval --setting given JSON; repeat it to combine runs (for each set and "
                             "target the run with the most questions counts; for the collapse target a "
                             "failing run counts, so every system of every run is checked)")
    parser.add_argument("--retrieval", help="regrad eval --setting retrieval JSON")
    args = parser.parse_args(argv)
    best: dict[tuple[str, str], tuple[int, tuple]] = {}
    for path in args.given:
        given = json.load(open(path, encoding="utf-8"))
        for row in check_given(given["report"], given.get("questions", ())):
            n, key = given["report"][row[0]]["n"], (row[0], row[1])
            if key not in best:
                best[key] = (n, row)
            elif row[1] == COLLAPSE:  # every system of every run counts: a collapse anywhere fails
                if (row[2], -n) < (best[key][1][2], -best[key][0]):  # failing first, then more questions
                    best[key] = (n, row)
            elif n > best[key][0]:
                best[key] = (n, row)
    rows = [(n, *row) for n, row in best.values()]
    if args.retrieval:
        retrieval = json.load(open(args.retrieval, encoding="utf-8"))
        report = retrieval["report"]
        rows += [(report[row[0]]["n"], *row) for row in check_retrieval(report, retrieval.get("questions", ()))]
    if not rows:
        parser.error("pass --given and/or --retrieval")
    print("| set | target | n | met | measured |\n|---|---|---|---|---|")
    for n, name, target, met, measured in rows:
        print(f"| {name} | {target} | {n} | {'yes' if met else '**no**'} | {measured} |")
    print(f"\n{sum(r[3] for r in rows)} of {len(rows)} targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
