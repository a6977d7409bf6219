"""Stage 1: meta-learning (MAML-style, bi-level) of the LoRA initialisation phi and step sizes alpha.

For a task (question q, answer a, passages p_1..p_k); in ``mixed`` mode every second task
of a batch is hybrid, so one checkpoint serves both modes:
    inner:  g_j = grad_phi L_LM(p_j; phi)            (create_graph: differentiable)
    update: phi' = phi - alpha (.) sum_j g_j          (apply_update)
    outer:  L_QA = -log p(a | q [, passages]; phi')  (answer tokens only)
phi and alpha are trained on L_QA with AdamW, warm-up + linear decay and clipping.
All tasks of a meta-step run batched: their k passages share one backward, and each task
runs the outer pass with its own phi' (batched factors).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from regrad_engine.checkpoint import MetaCheckpoint
from regrad_engine.config import MetaTrainConfig
from regrad_engine.data import MetaExample
from regrad_engine.errors import check_mode
from regrad_engine.gradients import DEFAULT_LOSS_CHUNK, document_gradients, model_loss
from regrad_engine.lora import LoraSpace, Phi, apply_update, init_step_sizes
from regrad_engine.prompts import bos_prefix, encode_documents, encode_qa_batch

_T = TypeVar("_T")
_U = TypeVar("_U")


def hybrid_tasks(mode: str, n: int) -> list[bool]:
    """Which of n tasks read their passages in the prompt: none (parametric), all (hybrid),
    or every second one (mixed: one checkpoint meta-trained for both modes)."""
    check_mode(mode, allowed=("parametric", "hybrid", "mixed"))
    return [mode == "hybrid" or (mode == "mixed" and i % 2 == 1) for i in range(n)]


def sum_per_task(grads: Phi, owner: Tensor, num_tasks: int) -> Phi:
    """Sum per-passage gradients (n, *shape) into per-task sums (num_tasks, *shape)."""
    return {k: torch.zeros((num_tasks, *g.shape[1:]), dtype=g.dtype, device=g.device).index_add(0, owner, g)
            for k, g in grads.items()}


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch as tensors: passages (n, t) with the task each belongs to, and the QA
    sequences (tasks, t) with answer-only labels. Made by :func:`encode_tasks`."""

    size: int
    docs: dict[str, Tensor]
    owner: Tensor  # (n,) task index of each passage
    qa: dict[str, Tensor]

    def to(self, device: torch.device) -> TaskBatch:
        return TaskBatch(self.size, {k: v.to(device) for k, v in self.docs.items()}, self.owner.to(device),
                         {k: v.to(device) for k, v in self.qa.items()})

    def split(self, size: int) -> list[TaskBatch]:
        """Micro-batches of ``size`` tasks (the last may be smaller), padding trimmed to each."""
        parts = []
        for start in range(0, self.size, size):
            stop = min(self.size, start + size)
            rows = ((self.owner >= start) & (self.owner < stop)).nonzero().squeeze(1)
            parts.append(TaskBatch(stop - start, _trimmed({k: v[rows] for k, v in self.docs.items()}),
                                   self.owner[rows] - start,
                                   _trimmed({k: v[start:stop] for k, v in self.qa.items()})))
        return parts


def _trimmed(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A right-padded batch cut to its longest row."""
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width] for k, v in batch.items()}


def encode_tasks(tokenizer, tasks: Sequence[MetaExample], *, mode: str = "parametric", doc_max_tokens: int = 200,
                 qa_max_length: int = 1536) -> TaskBatch:
    """Tokenise a meta-batch (CPU work that :meth:`MetaTrainer.fit` overlaps with the previous step)."""
    in_prompt = hybrid_tasks(mode, len(tasks))
    qa = encode_qa_batch(tokenizer, [t.question for t in tasks], [t.answers[0] for t in tasks],
                         [t.passages if h else None for t, h in zip(tasks, in_prompt)], qa_max_length)
    docs = encode_documents(tokenizer, [p for t in tasks for p in t.passages], doc_max_tokens)
    owner = torch.tensor([i for i, t in enumerate(tasks) for _ in t.passages])
    return TaskBatch(len(tasks), docs, owner, qa)


def meta_loss(model: nn.Module, tokenizer, space: LoraSpace, phi: Phi, alpha: Phi,
              tasks: Sequence[MetaExample] | TaskBatch, *, mode: str = "parametric", doc_max_tokens: int = 200,
              qa_max_length: int = 1536, create_graph: bool = True, use_gradients: bool = True,
              loss_chunk: int = DEFAULT_LOSS_CHUNK, checkpoint_layers: bool = False) -> Tensor:
    """Mean outer (answer-token) loss of the tasks after their inner update.

    Args:
        tasks: The tasks, or their :func:`encode_tasks` batch (then ``mode``,
            ``doc_max_tokens`` and ``qa_max_length`` were applied there).
        create_graph: Differentiate through the inner gradients (training); False for eval.
        use_gradients: False evaluates phi itself (no inner update), a baseline.
        loss_chunk: Labelled positions per chunk of the LM losses (0: full logits).
        checkpoint_layers: Recompute decoder layers in backward (inner and outer pass).

    Returns:
        Scalar loss.
    """
    device = next(iter(phi.values())).device
    if not isinstance(tasks, TaskBatch):
        tasks = encode_tasks(tokenizer, tasks, mode=mode, doc_max_tokens=doc_max_tokens, qa_max_length=qa_max_length)
    batch = tasks.to(device)
    options = {"loss_chunk": loss_chunk, "checkpoint_layers": checkpoint_layers}
    if use_gradients:
        grads = document_gradients(model, space, phi, batch.docs, create_graph=create_graph, **options)
        adapted = apply_update(phi, sum_per_task(grads, batch.owner, batch.size), alpha)
    else:
        adapted = phi
    return model_loss(model, space, adapted, batch.qa, **options).mean()


def evaluate_loss(model, tokenizer, space, phi, alpha, tasks, *, batch_size: int = 4, **kwargs) -> float:
    """Mean outer loss over tasks, no graph kept."""
    total = 0.0
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start:start + batch_size]
        loss = meta_loss(model, tokenizer, space, phi, alpha, chunk, create_graph=False, **kwargs)
        total += loss.item() * len(chunk)
    return total / max(1, len(tasks))


def _schedule(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, int(total * warmup_ratio))
    return lambda step: min(1.0, (step + 1) / warmup) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _autocast(device: torch.device, enabled: bool, cpu: bool = False):
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prefetched(encode: Callable[[_T], _U], items: Iterable[_T], pool: Executor) -> Iterator[_U]:
    """``encode(item)`` for every item, the next one computed on ``pool`` while the caller
    works on the current one (tokenisation overlaps the GPU step; fast tokenisers release the GIL)."""
    items = iter(items)
    pending = [pool.submit(encode, item) for item in itertools.islice(items, 1)]
    while pending:
        result = pending.pop().result()
        pending = [pool.submit(encode, item) for item in itertools.islice(items, 1)]
        yield result


class MetaTrainer:
    """Runs meta-training; every evaluation writes ``out/last`` (with optimiser state) and
    ``out/steps/step-NNNNNN``, and ``out/best`` on dev improvement.

    Args:
        model: Frozen base model, SDPA or eager attention (the differentiable inner pass runs
            SDPA's math backend: the fused kernels have no double backward).
        tokenizer: Its tokenizer (with chat template).
        space: Adaptation space installed on the model.
        config: Training settings.
        base_model: Name recorded in checkpoints.
        base_fingerprint: Fingerprint of the base model (see ``models.model_fingerprint``).
        init: Start from this checkpoint's phi/alpha (continued training) instead of fresh.
    """

    def __init__(self, model, tokenizer, space: LoraSpace, config: MetaTrainConfig, *,
                 base_model: str, base_fingerprint: str, init: MetaCheckpoint | None = None) -> None:
        self.model, self.tokenizer, self.space, self.cfg = model, tokenizer, space, config
        self.base_model, self.base_fingerprint = base_model, base_fingerprint
        self.device = torch.device(config.device)
        if config.cpu_bf16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn("--cpu-bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 autocast will be "
                          "slower than fp32 here; drop --cpu-bf16", stacklevel=2)
        if init is not None:
            init.check_base(base_fingerprint, base_model, tokenizer=tokenizer)
            phi0 = {k: v.float() for k, v in init.phi.items()}
            alpha0 = {k: v.float() for k, v in init.alpha.items()}
        else:
            phi0 = space.init_phi(seed=config.seed)
            alpha0 = init_step_sizes(phi0, config.alpha_mode, config.alpha_init)
        self.phi = {k: nn.Parameter(v.to(self.device)) for k, v in phi0.items()}
        self.alpha = {k: nn.Parameter(v.to(self.device), requires_grad=config.alpha_mode != "fix")
                      for k, v in alpha0.items()}
        groups = [{"params": list(self.phi.values()), "lr": config.lr}]
        if config.alpha_mode != "fix":
            groups.append({"params": list(self.alpha.values()), "lr": config.alpha_lr or config.lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config.steps, config.warmup_ratio))
        self.step = 0
        self.best = math.inf
        self.history: list[dict] = []

    # -------------------------------------------------------------- checkpoints
    def checkpoint(self, metrics: dict | None = None) -> MetaCheckpoint:
        return MetaCheckpoint(phi={k: v.detach().clone() for k, v in self.phi.items()},
                              alpha={k: v.detach().clone() for k, v in self.alpha.items()},
                              alpha_mode=self.cfg.alpha_mode, lora=self.space.spec(),
                              base_model=self.base_model, base_fingerprint=self.base_fingerprint,
                              mode=self.cfg.mode, step=self.step, metrics=metrics or {},
                              document_bos=bool(bos_prefix(self.tokenizer)))

    def save_state(self, directory: Path) -> None:
        """Checkpoint + optimiser state, enough to resume exactly (no pickle)."""
        self.checkpoint({"history": self.history[-1:]}).save(directory)
        state = self.optimizer.state_dict()
        tensors = {f"{i}/{name}": value.detach().cpu().contiguous()
                   for i, slot in state["state"].items() for name, value in slot.items()}
        save_file(tensors, directory / "optimizer.safetensors")
        (directory / "trainer_state.json").write_text(json.dumps(
            {"step": self.step, "best": self.best, "history": self.history}, indent=1))

    def load_state(self, directory: Path) -> None:
        ckpt = MetaCheckpoint.load(directory, device=self.device)
        ckpt.check_base(self.base_fingerprint, self.base_model, tokenizer=self.tokenizer)
        with torch.no_grad():
            for k, v in ckpt.phi.items():
                self.phi[k].copy_(v)
            for k, v in ckpt.alpha.items():
                self.alpha[k].copy_(v)
        tensors = load_file(directory / "optimizer.safetensors", device=str(self.device))
        state = self.optimizer.state_dict()
        slots: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            index, name = key.split("/", 1)
            slots.setdefault(int(index), {})[name] = value
        state["state"] = slots
        self.optimizer.load_state_dict(state)
        info = json.loads((directory / "trainer_state.json").read_text())
        self.step, self.best, self.history = info["step"], info["best"], info["history"]
        self.scheduler.last_epoch = self.step - 1
        with warnings.catch_warnings():  # this restores the schedule after a resume; no optimizer step is skipped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()

    # -------------------------------------------------------------- training
    def _settings(self) -> dict:
        return {"mode": self.cfg.mode, "doc_max_tokens": self.cfg.doc_max_tokens,
                "qa_max_length": self.cfg.qa_max_length, "loss_chunk": self.cfg.loss_chunk,
                "checkpoint_layers": self.cfg.gradient_checkpointing}

    def encode(self, tasks: Sequence[MetaExample]) -> TaskBatch:
        """The meta-batch tokenised under this trainer's settings (mode, lengths)."""
        return encode_tasks(self.tokenizer, tasks, mode=self.cfg.mode, doc_max_tokens=self.cfg.doc_max_tokens,
                            qa_max_length=self.cfg.qa_max_length)

    def _loss(self, tasks: Sequence[MetaExample] | TaskBatch, create_graph: bool = True) -> Tensor:
        return meta_loss(self.model, self.tokenizer, self.space, self.phi, self.alpha, tasks,
                         create_graph=create_graph, **self._settings())

    def dev_loss(self, dev: Sequence[MetaExample]) -> float:
        with _autocast(self.device, self.cfg.bf16):
            return evaluate_loss(self.model, self.tokenizer, self.space, self.phi, self.alpha,
                                 list(dev[: self.cfg.dev_size]), **self._settings())

    def accumulate_gradients(self, tasks: Sequence[MetaExample] | TaskBatch) -> Tensor:
        """Add the gradient of the tasks' mean loss to phi's and alpha's ``.grad``, micro-batches of
        ``config.micro_batch`` tasks at a time (each task's loss is independent: the same gradient,
        less memory). Returns the loss."""
        batch = tasks if isinstance(tasks, TaskBatch) else self.encode(tasks)
        total = torch.zeros((), device=self.device)
        for part in batch.split(self.cfg.micro_batch) if self.cfg.micro_batch else [batch]:
            with _autocast(self.device, self.cfg.bf16, cpu=self.cfg.cpu_bf16):
                loss = self._loss(part) * (part.size / batch.size)
            loss.backward()
            total += loss.detach()
        return total

    def train_step(self, tasks: Sequence[MetaExample] | TaskBatch) -> float:
        """One meta-step (gradient, clipping, AdamW, schedule); returns the loss."""
        loss = self.accumulate_gradients(tasks)
        params = list(self.phi.values()) + [a for a in self.alpha.values() if a.requires_grad]
        nn.utils.clip_grad_norm_(params, self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.item()

    def fit(self, train: Sequence[MetaExample], dev: Sequence[MetaExample], out: str | Path,
            log: Callable[[str], None] = print, progress: bool = True,
            stop_after: int | None = None) -> MetaCheckpoint:
        """Train for ``config.steps`` meta-steps; returns the best checkpoint (by dev loss).

        ``stop_after`` ends this run after that many steps (state saved; a later ``fit``
        resumes from ``out/last``), for time-sliced jobs.
        """
        from tqdm.auto import tqdm

        out = Path(out)
        if self.cfg.resume and (out / "last" / "trainer_state.json").exists():
            self.load_state(out / "last")
            log(f"resumed from {out / 'last'} at step {self.step}")
        if self.step == 0:
            start = self.dev_loss(dev)
            self.history.append({"step": 0, "dev_loss": start})
            log(f"step 0 dev_loss {start:.4f}")
        rng = random.Random(self.cfg.seed)
        order: list[int] = []
        for _ in range(self.step):  # replay the data order so a resumed run sees the same tasks
            order = self._next_batch(order, rng, len(train))[1]
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="meta-train", disable=not progress)
        recent: list[float] = []
        started = time.time()
        end = self.cfg.steps if stop_after is None else min(self.cfg.steps, self.step + stop_after)
        with ThreadPoolExecutor(max_workers=1) as pool:  # tokenises the next batch while this one trains
            for batch in prefetched(self.encode, self._task_batches(train, order, rng, end - self.step), pool):
                recent.append(self.train_step(batch))
                bar.update(1)
                bar.set_postfix(loss=f"{sum(recent[-20:]) / len(recent[-20:]):.3f}")
                if self.step % self.cfg.eval_every == 0 or self.step == end:
                    self._evaluate_and_save(dev, out, recent, time.time() - started, log)
                    recent = []
        bar.close()
        (out / "history.json").write_text(json.dumps(self.history, indent=1))
        return MetaCheckpoint.load(out / "best") if (out / "best").exists() else self.checkpoint()

    def _evaluate_and_save(self, dev: Sequence[MetaExample], out: Path, recent: list[float], seconds: float,
                           log: Callable[[str], None]) -> None:
        """Dev loss, history record, ``steps/step-N``, ``best`` on improvement and ``last`` with its state."""
        dev_loss = self.dev_loss(dev)
        record = {"step": self.step, "train_loss": sum(recent) / len(recent), "dev_loss": dev_loss,
                  "alpha_mean": float(torch.stack([a.detach().mean() for a in self.alpha.values()]).mean()),
                  "seconds": round(seconds, 1)}
        self.history.append(record)
        log(json.dumps(record))
        self.checkpoint({"dev_loss": dev_loss}).save(out / "steps" / f"step-{self.step:06d}")
        if dev_loss < self.best:
            self.best = dev_loss
            self.checkpoint({"dev_loss": dev_loss}).save(out / "best")
        self.save_state(out / "last")

    def _task_batches(self, train: Sequence[MetaExample], order: list[int], rng: random.Random,
                      count: int) -> Iterator[list[MetaExample]]:
        for _ in range(count):
            indices, order = self._next_batch(order, rng, len(train))
            yield [train[i] for i in indices]

    def _next_batch(self, order: list[int], rng: random.Random, n: int) -> tuple[list[int], list[int]]:
        size = self.cfg.tasks_per_step
        while len(order) < size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order = order + fresh
        return order[:size], order[size:]
