"""Two `regrad eval --out` reports of the same data side by side: each set's F1 (EM for PubMedQA)
of the systems that matter, for checkpoint A and checkpoint B, and what the gradients add over
random passages' gradients (ReGrad parametric - random, with the paired 95% bootstrap interval
of the per-question gap in the row's metric).

    python benchmarks/compare_checkpoints.py A.json B.json [--names "step 160" "step 240"] [--common]

Systems missing from either file are left out. With ``--common`` both files are scored again on
the questions they share only (by id; e.g. a ``--limit 30`` run against a full one), from
their per-question answers.
"""

from __future__ import annotations

import argparse
import json
import sys

from targets import paired_gap  # this directory is on the path when run as a script

from regrad_engine.data import EvalItem
from regrad_engine.evaluation import EvalRun, summarize
from regrad_engine.metrics import exact_match, token_f1
from regrad_engine.retrieval.base import Hit

SYSTEMS = ("meta_lora", "random_grads", "format_control", "regrad", "rag", "regrad_hybrid")


def common_report(run: dict, ids: set[str]) -> dict[str, dict]:
    """``run``'s report over the questions whose id is in ``ids``: the evaluation's own
    ``summarize`` on the per-question answers (systems that answered all of them)."""
    rows = [q for q in run["questions"] if q["id"] in ids]
    items = [EvalItem(id=q["id"], question=q["question"], answers=q["answers"], doc_ids=q["documents"],
                      gold_id=q["gold_id"], source=q["source"]) for q in rows]
    systems = [s for s in rows[0]["predictions"] if all(s in q["predictions"] for q in rows)]
    return summarize(EvalRun(run["setting"], items, [[Hit(d, "", 0.0) for d in q["documents"]] for q in rows],
                             {s: [q["predictions"][s] for q in rows] for s in systems}), seed=run.get("seed", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--names", nargs=2, default=["A", "B"])
    parser.add_argument("--common", action="store_true", help="score both on the questions they share only")
    args = parser.parse_args()
    runs = [json.load(open(path)) for path in (args.a, args.b)]
    if args.common:
        ids = {q["id"] for q in runs[0]["questions"]} & {q["id"] for q in runs[1]["questions"]}
        if not ids:
            sys.exit("the two files share no question id: nothing to compare")
        for run in runs:
            run["report"] = common_report(run, ids)
            run["questions"] = [q for q in run["questions"] if q["id"] in ids]
        print(f"(scored on the {len(ids)} questions both files answered)", file=sys.stderr)
    reports = [run["report"] for run in runs]
    systems = [s for s in SYSTEMS if all(s in next(iter(r.values()))["systems"] for r in reports)]
    gap = "regrad" in systems and "random_grads" in systems
    print("| set | metric | majority label (its share) | " + " | ".join(f"{s} {n}" for s in systems for n in args.names)
          + "".join(f" | ReGrad - random {n}" for n in args.names if gap) + " |")
    print("|---|---|---|" + "---|" * (len(args.names) * (len(systems) + gap)))
    sets = [name for name in reports[0] if name in reports[1]]
    for name in sorted(set(reports[0]) ^ set(reports[1])):
        print(f"(set {name} is in only one of the files: left out)", file=sys.stderr)
    for name in sets:
        metric = "exact_match" if name == "pubmedqa" else "f1"
        score = exact_match if metric == "exact_match" else token_f1
        majority = reports[0][name]["systems"]["majority"][metric]["mean"]  # the same data: the same for both
        cells = [f"{majority:.3f} ({reports[0][name]['majority_share']:.2f})"]
        cells += [f"{r[name]['systems'][s][metric]['mean']:.3f}" for s in systems for r in reports]
        if gap:
            cells += [f"{r[name]['systems']['regrad'][metric]['mean'] - r[name]['systems']['random_grads'][metric]['mean']:+.3f}"
                      + paired_gap(run["questions"], name, "regrad", "random_grads", score)
                      for r, run in zip(reports, runs)]
        print(f"| {name} | {'EM' if metric == 'exact_match' else 'F1'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
