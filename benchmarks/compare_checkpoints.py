"""Two `regrad eval --out` reports of the same data side by side: each set's F1 (EM for PubMedQA)
of the systems that matter, for checkpoint A and checkpoint B, and what the gradients add over
random passages' gradients (ReGrad parametric - random, with the paired 95% bootstrap interval
of the per-question gap in the row's metric).

    python benchmarks/compare_checkpoints.py A.json B.json [--names "step 160" "step 240"]

Systems missing from either file are left out.
"""

from __future__ import annotations

import argparse
import json
import sys

from targets import paired_gap  # this directory is on the path when run as a script

from regrad_engine.metrics import exact_match, token_f1

SYSTEMS = ("meta_lora", "random_grads", "format_control", "regrad", "rag", "regrad_hybrid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--names", nargs=2, default=["A", "B"])
    args = parser.parse_args()
    runs = [json.load(open(path)) for path in (args.a, args.b)]
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
