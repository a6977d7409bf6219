"""Two `regrad eval --out` reports of the same data side by side: each set's F1 (EM for PubMedQA)
of the systems that matter, for checkpoint A and checkpoint B.

    python benchmarks/compare_checkpoints.py A.json B.json [--names "step 160" "step 240"]
"""

from __future__ import annotations

import argparse
import json

SYSTEMS = ("random_grads", "format_control", "regrad", "rag", "regrad_hybrid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--names", nargs=2, default=["A", "B"])
    args = parser.parse_args()
    reports = [json.load(open(path))["report"] for path in (args.a, args.b)]
    print("| set | metric | majority label (its share) | " + " | ".join(f"{s} {n}" for s in SYSTEMS for n in args.names)
          + " |")
    print("|---|---|---|" + "---|" * (2 * len(SYSTEMS)))
    for name in reports[0]:
        metric = "exact_match" if name == "pubmedqa" else "f1"
        majority = reports[0][name]["systems"]["majority"][metric]["mean"]  # the same data: the same for both
        cells = [f"{majority:.3f} ({reports[0][name]['majority_share']:.2f})"]
        cells += [f"{r[name]['systems'][s][metric]['mean']:.3f}" for s in SYSTEMS for r in reports]
        print(f"| {name} | {'EM' if metric == 'exact_match' else 'F1'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
