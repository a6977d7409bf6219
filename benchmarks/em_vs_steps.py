"""Exact match of ReGrad parametric on held-out entities against meta-training steps.

    python benchmarks/em_vs_steps.py --run runs/meta-synth --data runs/synth --limit 120

Evaluates every checkpoint in RUN/steps/ (written at each dev evaluation of `regrad train`)
plus the untrained initialisation (step 0: raw gradients at a fresh LoRA with the initial
step size), prints a table and writes a plot (PNG) next to this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training output directory (with steps/)")
    parser.add_argument("--data", required=True, help="data directory of the run")
    parser.add_argument("--limit", type=int, default=120, help="held-out questions per point")
    parser.add_argument("--split", default="test")
    parser.add_argument("--alpha-init", type=float, default=10.0, help="step size of the step-0 point")
    parser.add_argument("--plot", default=str(Path(__file__).with_name("em_vs_steps.png")))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.evaluation import evaluate_systems, overall_scores
    from regrad_engine.lora import LoraSpace, init_step_sizes, lora_config_from_dict
    from regrad_engine.models import load_model

    model = load_model()
    steps = sorted(Path(args.run, "steps").glob("step-*"))
    if not steps:
        print(f"no checkpoints in {args.run}/steps", file=sys.stderr)
        return 2
    first = MetaCheckpoint.load(steps[0])
    space = LoraSpace(model.model, lora_config_from_dict(first.lora))
    phi0 = space.init_phi(seed=0)
    initial = MetaCheckpoint(phi=phi0, alpha=init_step_sizes(phi0, first.alpha_mode, args.alpha_init),
                             alpha_mode=first.alpha_mode, lora=first.lora, base_model=first.base_model,
                             base_fingerprint=first.base_fingerprint, document_bos=first.document_bos)
    points = []
    for step, ckpt in [(0, initial)] + [(int(p.name.split("-")[1]), MetaCheckpoint.load(p)) for p in steps]:
        scores = overall_scores(evaluate_systems(model, ckpt, args.data, split=args.split, limit=args.limit,
                                                 systems=("regrad", "random_grads"), progress=False,
                                                 log=lambda s: None))
        points.append({"step": step, "regrad_em": scores["regrad"].exact_match, "regrad_f1": scores["regrad"].f1,
                       "random_em": scores["random_grads"].exact_match})
        print(json.dumps(points[-1]), flush=True)
    print("\n| meta-steps | ReGrad parametric EM | F1 | random gradients EM |\n|---|---|---|---|")
    for p in points:
        print(f"| {p['step']} | {p['regrad_em']:.3f} | {p['regrad_f1']:.3f} | {p['random_em']:.3f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: pip install 'regrad[plot]' for the plot")
        return 0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["step"] for p in points], [p["regrad_em"] for p in points], marker="o", label="ReGrad parametric")
    ax.plot([p["step"] for p in points], [p["random_em"] for p in points], marker="x", label="random gradients")
    ax.set_xlabel("meta-training steps")
    ax.set_ylabel(f"exact match ({args.split}, n={args.limit})")
    ax.set_title("SmolLM2-135M, held-out fictional entities, k=3")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
