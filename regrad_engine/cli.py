"""The ``regrad`` command line: one subcommand per job; heavy imports inside each job.

    regrad synth  --out data/synth                      # seeded synthetic QA corpus
    regrad train  --data data/synth --out runs/meta     # stage 1: meta-learning
    regrad build  --corpus docs.jsonl --meta runs/meta/best --bank runs/bank
    regrad ask    --bank runs/bank "Where was X born?"
    regrad eval   --data data/synth --meta runs/meta/best
    regrad demo                                         # everything, on the embedded model
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections.abc import Sequence

log = logging.getLogger("regrad")


def set_seed(seed: int) -> int:
    """Seed python and torch; returns the seed so it can be logged."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    return seed


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF id or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _cmd_synth(args) -> int:
    from regrad_engine.synthetic import generate_corpus

    corpus = generate_corpus(args.entities, seed=args.seed)
    corpus.write(args.out)
    print(f"wrote {len(corpus.documents)} documents, {len(corpus.train)}/{len(corpus.dev)}/{len(corpus.test)} "
          f"train/dev/test questions to {args.out}")
    return 0


def _cmd_train(args) -> int:
    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.config import MetaTrainConfig, load_config
    from regrad_engine.data import meta_examples
    from regrad_engine.lora import LoraSpace, lora_config_from_dict
    from regrad_engine.meta import MetaTrainer

    overrides = {k: getattr(args, k) for k in ("model", "data", "out", "init_from", "mode", "k", "steps",
                                                "tasks_per_step", "lr", "alpha_lr", "alpha_mode", "alpha_init",
                                                "doc_max_tokens", "eval_every", "dev_size", "device", "seed")}
    lora = {k: v for k, v in (("r", args.rank), ("lora_alpha", args.lora_alpha), ("layers", args.layers)) if v is not None}
    if lora:
        overrides["lora"] = lora
    cfg = load_config(MetaTrainConfig, args.config, overrides)
    log.info("seed %d", set_seed(cfg.seed))
    model = _load(cfg.model, cfg.device, args.dtype, args.threads, attn="eager")
    init = MetaCheckpoint.load(cfg.init_from) if cfg.init_from else None
    space = LoraSpace(model.model, lora_config_from_dict(init.lora) if init else _lora_config(model.model, cfg.lora))
    train = meta_examples(cfg.data, "train", k=cfg.k, seed=cfg.seed)
    dev = meta_examples(cfg.data, "dev", k=cfg.k, seed=cfg.seed + 1)
    print(f"meta-training on {len(train)} questions ({space.num_parameters:,} LoRA numbers, "
          f"{len(space.modules)} modules), config:\n{cfg.model_dump_json(indent=1)}", flush=True)
    trainer = MetaTrainer(model.model, model.tokenizer, space, cfg, base_model=model.name,
                          base_fingerprint=model.fingerprint, init=init)
    best = trainer.fit(train, dev, cfg.out, log=lambda s: print(s, flush=True))
    print(f"best checkpoint: {cfg.out}/best (dev loss {best.metrics.get('dev_loss')})")
    return 0


def _lora_config(model, settings):
    from regrad_engine.lora import default_lora_config

    config = default_lora_config(model.config.num_hidden_layers, r=settings.r, lora_alpha=int(settings.lora_alpha))
    config.target_modules = list(settings.target_modules)
    if settings.layers is not None:
        config.layers_to_transform = list(settings.layers)
    return config


def _load(name, device, dtype, threads, attn="sdpa"):
    import torch

    from regrad_engine.models import load_model

    if threads:
        torch.set_num_threads(threads)
    return load_model(name, device=device, dtype=getattr(torch, dtype), attn_implementation=attn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regrad", description="ReGrad: retrievable gradients for RAG apps")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a seeded synthetic QA corpus about fictional entities")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--entities", type=int, default=600, help="number of fictional entities")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="stage 1: meta-learn the LoRA initialisation and step sizes")
    p.add_argument("--config", help="JSON config file (flags override it)")
    p.add_argument("--data", help="data directory (corpus.jsonl, train.jsonl, dev.jsonl)")
    p.add_argument("--out", help="checkpoint directory")
    p.add_argument("--init-from", dest="init_from", help="continue from this meta checkpoint")
    p.add_argument("--mode", choices=["parametric", "hybrid"])
    p.add_argument("--k", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--tasks-per-step", dest="tasks_per_step", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--alpha-lr", dest="alpha_lr", type=float)
    p.add_argument("--alpha-mode", dest="alpha_mode", choices=["tie", "full", "same", "fix"])
    p.add_argument("--alpha-init", dest="alpha_init", type=float)
    p.add_argument("--rank", type=int)
    p.add_argument("--lora-alpha", dest="lora_alpha", type=float)
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated block indices")
    p.add_argument("--doc-max-tokens", dest="doc_max_tokens", type=int)
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--dev-size", dest="dev_size", type=int)
    p.add_argument("--seed", type=int)
    _add_model_args(p)
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from regrad_engine.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"regrad {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
