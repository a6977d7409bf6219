"""Meta-step precision on CPU, side by side in one run: the same meta micro-batch (real tasks from a
`regrad data` directory, create_graph through the inner step) in fp32 and under bf16 autocast
(`regrad train --cpu-bf16`). Prints seconds per pass, the loss, and how the bf16 meta-gradient
compares with the fp32 one (cosine, norm ratio).

    python benchmarks/train_precision.py [--meta CHECKPOINT] [--data runs/general] [--tasks 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.config import MetaTrainConfig
from regrad_engine.data import meta_examples
from regrad_engine.lora import LoraSpace
from regrad_engine.meta import MetaTrainer, cpu_has_native_bf16
from regrad_engine.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--meta", default="regrad_engine/checkpoints/smollm2-135m-general", help="phi/alpha to start from")
    p.add_argument("--data", default="runs/general", help="`regrad data` directory")
    p.add_argument("--tasks", type=int, default=4, help="tasks in the micro-batch")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per precision (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    init = MetaCheckpoint.load(args.meta)
    space = LoraSpace.attach(model.model, init.lora)
    tasks = meta_examples(args.data, "train", k=3, seed=0)[: args.tasks]
    results = {}
    for name, cpu_bf16 in (("fp32", False), ("bf16 autocast", True)):
        cfg = MetaTrainConfig(data=args.data, out="unused", mode="mixed", tasks_per_step=args.tasks,
                              cpu_bf16=cpu_bf16)
        trainer = MetaTrainer(model.model, model.tokenizer, space, cfg, base_model=model.name,
                              base_fingerprint=model.fingerprint, init=init)
        batch = trainer.encode(tasks)
        times = []
        for _ in range(1 + args.repeats):
            trainer.optimizer.zero_grad(set_to_none=True)
            started = time.perf_counter()
            loss = trainer.accumulate_gradients(batch).item()
            times.append(time.perf_counter() - started)
        grad = torch.cat([q.grad.flatten() for q in [*trainer.phi.values(), *trainer.alpha.values()]])
        results[name] = (min(times[1:]), loss, grad)
        print(f"{name}: {min(times[1:]):.1f} s per pass of {args.tasks} tasks (warm-up {times[0]:.1f} s), "
              f"loss {loss:.4f}", flush=True)
    (t32, _, g32), (t16, _, g16) = results["fp32"], results["bf16 autocast"]
    cosine = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    print(f"speed-up {t32 / t16:.2f}x; meta-gradient cosine {cosine:.5f}, norm ratio {float(g16.norm() / g32.norm()):.4f}; "
          f"native bf16 on this CPU: {cpu_has_native_bf16()}; {args.threads} threads")


if __name__ == "__main__":
    main()
