"""The ``regrad`` command line: one subcommand per job; heavy imports inside each job.

    regrad data   --out data/general                    # real QA sets of ../shared/data, pooled
    regrad synth  --out data/synth                      # seeded synthetic QA corpus
    regrad train  --data data/general --out runs/meta --mode mixed   # stage 1: meta-learning
    regrad build  --corpus docs.jsonl --meta runs/meta/best --store runs/store
    regrad build  --elasticsearch URL --index docs --meta runs/meta/best --store runs/es  # an existing index
    regrad build  --ray ADDRESS --corpus docs.jsonl --meta runs/meta/best --store /shared/store --device cuda
    regrad delete --store runs/store doc-17 doc-18      # remove documents (all their chunks)
    regrad merge  --store runs/store                    # after `build --worker i --num-workers n`
    regrad verify --store runs/store [--repair]         # check every checksum; drop what is damaged
    regrad compact --store runs/store                   # remove deleted and replaced gradients from disk
    regrad ask    --store runs/store "Where was X born?"
    regrad serve  --store runs/store [--port 8000]      # OpenAI-compatible HTTP API, requests batched
    regrad eval   --data data/general --meta runs/meta/best [--setting retrieval]
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
    p.add_argument("--model", default=None, help="HF id, local path, or embedded:gemma3-270m (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _cmd_synth(args) -> int:
    from regrad_engine.datasets.synthetic import generate_corpus

    corpus = generate_corpus(args.entities, seed=args.seed)
    corpus.write(args.out)
    print(f"wrote {len(corpus.documents)} documents, {len(corpus.train)}/{len(corpus.dev)}/{len(corpus.test)} "
          f"train/dev/test questions to {args.out}")
    return 0


def _cmd_data(args) -> int:
    from regrad_engine.datasets.general import SOURCES, build_general

    sources = args.sources.split(",") if args.sources else list(SOURCES)
    build_general(args.out, sources=sources, max_words=args.max_words, test_questions=args.test_questions,
                  dev_questions=args.dev_questions, train_questions=args.train_questions,
                  synthetic_share=args.synthetic_share, seed=args.seed)
    return 0


def _cmd_train(args) -> int:
    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.config import MetaTrainConfig, load_config
    from regrad_engine.data import meta_examples
    from regrad_engine.errors import ConfigError
    from regrad_engine.lora import LoraSpace
    from regrad_engine.meta import MetaTrainer

    overrides = _config_overrides(args)
    cfg = load_config(MetaTrainConfig, args.config, overrides)
    check_device(cfg.device)
    log.info("seed %d", set_seed(cfg.seed))
    model = _load(cfg.model, cfg.device, args.dtype, args.threads, attn=cfg.attention)
    init = MetaCheckpoint.load(cfg.init_from) if cfg.init_from else None
    try:
        space = LoraSpace.attach(model.model, init.lora if init else _lora_config(model.model, cfg.lora))
    except ValueError as err:  # e.g. --lora-target-modules naming no layer of this model
        raise ConfigError(str(err)) from None
    train = meta_examples(cfg.data, "train", k=cfg.k, seed=cfg.seed)
    dev = meta_examples(cfg.data, "dev", k=cfg.k, seed=cfg.seed + 1)
    print(f"meta-training on {len(train)} questions ({space.num_parameters:,} LoRA numbers, "
          f"{len(space.modules)} modules), config:\n{cfg.model_dump_json(indent=1)}", flush=True)
    trainer = MetaTrainer(model.model, model.tokenizer, space, cfg, base_model=model.name,
                          base_fingerprint=model.fingerprint, init=init)
    best = trainer.fit(train, dev, cfg.out, log=lambda s: print(s, flush=True), stop_after=cfg.stop_after)
    print(f"best checkpoint: {cfg.out}/best (dev loss {best.metrics.get('dev_loss')})")
    return 0


def _cmd_build(args) -> int:
    from regrad_engine.chunking import chunk_documents
    from regrad_engine.data import read_corpus
    from regrad_engine.store import build_store

    if not args.meta or not (args.corpus or args.elasticsearch is not None):
        raise _usage("build needs --corpus FILE (or --elasticsearch URL --index NAME) and --meta CHECKPOINT")
    if args.ray is not None and args.worker:
        raise _usage("--ray runs every worker itself: drop --worker (--num-workers sets how many models run)")
    es = _elasticsearch_index(args)  # connect before loading the model, so a bad URL fails fast
    if args.corpus:
        docs = read_corpus(args.corpus)
        tokenizer, model = _model_for_build(args)
        chunks = chunk_documents(docs, tokenizer, max_tokens=args.chunk_tokens)
        print(f"{len(docs)} documents -> {len(chunks)} chunks of <= {args.chunk_tokens} tokens", flush=True)
    else:
        from regrad_engine.retrieval.elasticsearch import index_chunks

        chunks = index_chunks(es)
        if not chunks:
            raise _usage(f"Elasticsearch index {es.index} at {es.url} has no documents with text in "
                         f"field {es.content_field!r}: pass --content-field or --corpus")
        tokenizer, model = _model_for_build(args)
        print(f"{len(chunks)} documents read from Elasticsearch index {es.index} at {es.url}; each is one chunk "
              f"(text past {args.chunk_tokens} tokens is not learned)", flush=True)
    reuse_index = es is not None and (args.reuse_index or not args.corpus)
    if args.ray is not None:
        stats = _build_on_ray(args, chunks, es, reuse_index)
    else:
        stats = build_store(args.store, chunks, model=model, meta_path=args.meta, doc_max_tokens=args.chunk_tokens,
                            storage_dtype=args.storage_dtype, batch_size=args.batch_size, overwrite=args.update,
                            worker=args.worker, num_workers=args.num_workers or 1, index=es, reuse_index=reuse_index)
    print(f"added {stats.added} gradients ({stats.ms_per_document:.0f} ms/document; {stats.changed} of them replace "
          f"gradients of documents whose text changed), {stats.skipped} already in the bank; store: {args.store}")
    return 0


def _model_for_build(args):
    """(tokenizer, model): a Ray build loads the model in its actors only, the driver just the tokenizer."""
    if args.ray is None:
        model = _load(args.model, args.device, args.dtype, args.threads)
        return model.tokenizer, model
    from regrad_engine.ray_build import ModelSpec

    return ModelSpec(args.model).tokenizer(), None


def _build_on_ray(args, chunks, es, reuse_index):
    """`regrad build --ray [ADDRESS]`: connect (bare --ray: $RAY_ADDRESS, a cluster started on this
    machine, else a new local one), build with one actor per GPU (--device cuda) or per --threads CPUs."""
    try:
        import ray

        from regrad_engine.ray_build import ModelSpec, build_store_ray
    except ImportError as err:
        raise _usage(f"--ray needs Ray: pip install 'regrad[ray]' ({err})") from None
    cuda = args.device.startswith("cuda")
    spec = ModelSpec(args.model, device="cuda" if cuda else args.device, dtype=args.dtype, threads=args.threads)
    ray.init(address=args.ray or None)
    try:
        return build_store_ray(args.store, chunks, loader=spec, meta_path=args.meta, doc_max_tokens=args.chunk_tokens,
                               storage_dtype=args.storage_dtype, batch_size=args.batch_size, overwrite=args.update,
                               workers=args.num_workers, cpus_per_worker=1 if cuda else args.threads or 1,
                               gpus_per_worker=1 if cuda else 0, index=es, reuse_index=reuse_index)
    finally:
        ray.shutdown()


def _elasticsearch_index(args):
    """The ElasticsearchIndex the build flags name, or None without --elasticsearch."""
    es_only = {"--index": args.index, "--content-field": args.content_field, "--title-field": args.title_field,
               "--id-field": args.id_field, "--search-fields": args.search_fields, "--reuse-index": args.reuse_index}
    if args.elasticsearch is None:
        given = [flag for flag, value in es_only.items() if value]
        if given:
            raise _usage(f"{', '.join(given)} need --elasticsearch URL")
        return None
    from regrad_engine.retrieval.elasticsearch import ElasticsearchIndex

    fields = {"content_field": args.content_field or "text", "title_field": args.title_field or "title",
              "id_field": args.id_field, "search_fields": args.search_fields}
    url, name = args.elasticsearch or None, args.index or "regrad"  # bare --elasticsearch: $ELASTICSEARCH_URL
    if args.reuse_index or not args.corpus:
        return ElasticsearchIndex.open(url, name, **fields)
    return ElasticsearchIndex.create(url, name, exist_ok=True, **fields)


def _cmd_delete(args) -> int:
    from regrad_engine.store import Store

    count = Store.open(args.store).delete(args.ids, compact=args.compact)
    print(f"deleted {count} chunks of {len(args.ids)} ids from {args.store}"
          + ("; their gradients are off the disk" if args.compact else "; `regrad compact` frees their disk space"))
    return 0


def _cmd_compact(args) -> int:
    from regrad_engine.store import Store

    freed = Store.open(args.store).compact()
    print(f"compacted {args.store}/bank: {freed / 1e6:.1f} MB freed")
    return 0


def _cmd_verify(args) -> int:
    from regrad_engine.store import Store

    report, no_gradient, orphans = Store.open(args.store).verify(repair=args.repair)
    print(report)
    if no_gradient:
        print(f"{len(no_gradient)} indexed documents have no gradient (e.g. {no_gradient[:3]}): run `regrad build` "
              "with the corpus to compute them")
    if orphans:
        print(f"{len(orphans)} gradients belong to no indexed document (e.g. {orphans[:3]})"
              + ("; removed" if args.repair else "; --repair removes them"))
    if report.ok and not orphans and not report.stray_files:
        print("the bank verifies" + ("" if not no_gradient else " (some documents still need `regrad build`)"))
        return 0
    if args.repair:
        print("repaired: damaged entries and stray files were dropped; run `regrad build` with the corpus to "
              "recompute the dropped documents")
        return 0
    print("damage found: run again with --repair, then `regrad build` with the corpus")
    return 1


def _cmd_merge(args) -> int:
    from regrad_engine.store import Store

    count = Store.open(args.store).merge()
    print(f"merged the workers' gradients: {count} documents in {args.store}/bank")
    return 0


def _cmd_ask(args) -> int:
    from regrad_engine.errors import check_request

    check_request(args.questions, mode=args.mode, k=args.k, gamma=args.gamma)
    engine = _open(args)
    answers = engine.answer_batch(args.questions, mode=args.mode, k=args.k, gamma=args.gamma)
    base = engine.generate(args.questions, None, None) if args.compare else [None] * len(answers)
    for answer, plain in zip(answers, base):
        print(f"Q: {answer.question}")
        if plain is not None:
            print(f"  base model : {plain}")
        print(f"  ReGrad {answer.mode:10s}: {answer.text}")
        if not answer.sources:
            print("    sources=[]: no document matched this question, so no gradient was applied")
        for hit in answer.sources:
            print(f"    [{hit.score:6.2f}] {hit.id}: {hit.text[:90]}")
    return 0


def _open(args, **engine_kwargs):
    import torch

    from regrad_engine.store import open_engine

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args.model, args.device, args.dtype, args.threads) if args.model else None
    return open_engine(args.store, model=model, device=args.device, dtype=getattr(torch, args.dtype), meta=args.meta,
                       **engine_kwargs)


def _cmd_serve(args) -> int:
    from regrad_engine.errors import check_gamma, check_k

    try:
        from regrad_engine.server import serve
    except ImportError as err:  # before the model loads: say what to install
        raise _usage(str(err)) from None
    if not 0 <= args.port <= 65535:
        raise _usage(f"--port must be between 0 and 65535, got {args.port}")
    for flag, value in (("--max-batch", args.max_batch), ("--max-tokens", args.max_tokens)):
        if value is not None:
            check_k(value, flag)
    if not 0 <= args.max_wait_ms <= 10_000:
        raise _usage(f"--max-wait-ms must be between 0 and 10000, got {args.max_wait_ms}")
    check_gamma(args.gamma)
    engine = _open(args, k=args.k, mode=args.mode, gamma=args.gamma,
                   **({"max_new_tokens": args.max_tokens} if args.max_tokens else {}))
    serve(engine, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          model_id=args.model_id, log_level="debug" if args.verbose else "info")
    return 0


def _usage(message: str):
    from regrad_engine.config import ConfigError

    return ConfigError(message)


def _cmd_eval(args) -> int:
    from pathlib import Path

    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.errors import check_gamma, check_k
    from regrad_engine.files import LockHeld, WriterLock, describe_holder

    check_k(args.k, "--k")
    check_gamma(args.gamma)
    meta = MetaCheckpoint.load(args.meta)
    header = {"meta": args.meta, "meta_fingerprint": meta.fingerprint(), "model": args.model, "dtype": args.dtype,
              "data": args.data, "split": args.split, "k": args.k, "setting": args.setting,
              "limit_per_set": args.limit, "seed": args.seed, "gamma": args.gamma}
    if not args.out:
        return _run_eval(args, meta, header, earlier=None)
    out = Path(args.out)
    if not out.name or out.is_dir():
        raise _usage(f"--out {args.out} is a directory: give the path of a JSON file, e.g. {out / 'eval.json'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = WriterLock(out.with_name(f".{out.name}.lock"))  # two evals into one --out would lose answers
    try:
        lock.acquire()
    except LockHeld as exc:
        raise _usage(f"--out {out} is being written by another `regrad eval` ({describe_holder(exc.holder)}): "
                     "wait for it to finish, or pick another --out") from None
    try:
        return _run_eval(args, meta, header, earlier=_earlier_eval(out, header))
    finally:
        lock.release()


def _run_eval(args, meta, header: dict, earlier: dict | None) -> int:
    from pathlib import Path

    from regrad_engine.evaluation import (
        SYSTEMS,
        evaluate_systems,
        markdown_tables,
        per_question,
        summarize,
    )
    from regrad_engine.files import atomic_write_json
    from regrad_engine.prompts import bos_prefix

    model = _load(args.model, args.device, args.dtype, args.threads)
    # How documents are encoded is only known once the tokenizer is loaded; gradients of documents
    # encoded otherwise are other gradients, so an earlier run's answers are not this run's.
    header = {**header, "document_bos": bool(bos_prefix(model.tokenizer))}
    said = earlier.get("document_bos") if earlier else None  # files from before it was recorded: unknown
    if said is not None and said != header["document_bos"]:
        raise _usage(f"--out {args.out} holds an evaluation whose documents were encoded "
                     f"{'with' if said else 'without'} the BOS token; this regrad version or tokenizer encodes them "
                     f"{'with' if header['document_bos'] else 'without'} it: pick another --out, or evaluate with the "
                     "regrad version and tokenizer it was written with")
    previous = earlier["questions"] if earlier else None
    systems = args.systems.split(",") if args.systems else SYSTEMS

    def save(run) -> None:  # after every system: an interrupted evaluation resumes from here
        atomic_write_json(args.out, {**header, "report": summarize(run, seed=args.seed),
                                     "questions": per_question(run)})

    try:
        run = evaluate_systems(model, meta, args.data, split=args.split, k=args.k, limit=args.limit,
                               seed=args.seed, systems=systems, setting=args.setting, gamma=args.gamma,
                               previous=previous,
                               on_system=save if args.out else None)
    except KeyboardInterrupt:
        if args.out and Path(args.out).exists():
            print(f"the finished systems' answers are in {args.out}: the same command resumes from there",
                  file=sys.stderr)
        raise
    print(markdown_tables(summarize(run, seed=args.seed), args.setting))
    return 0


EVAL_HEADER_BEFORE = {"gamma": 1.0}  # what `regrad eval` files written before these were recorded ran with


def _earlier_eval(out, header: dict) -> dict | None:
    """An earlier `regrad eval` into ``out`` with the same settings (its systems are not run
    again; its per-question records are under ``"questions"``), or None if there is none."""
    if not out.exists():
        return None
    try:
        earlier = json.loads(out.read_text(encoding="utf-8"))
        questions = earlier["questions"]
        if not isinstance(questions, list) or not all(isinstance(q, dict) for q in questions):
            raise TypeError("'questions' is not a list of records")
        if not isinstance(earlier.get("document_bos", False), bool):
            raise TypeError(f"'document_bos' is {earlier['document_bos']!r}, not true or false")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _usage(f"--out {out} exists but is not a readable `regrad eval` result ({exc}): "
                     "move it away or pick another --out (it is not overwritten)") from None
    written = {**EVAL_HEADER_BEFORE, **earlier}  # files from before a setting was recorded ran with its default
    differ = {key: (written.get(key), value) for key, value in header.items() if written.get(key) != value}
    if differ:
        said = ", ".join(f"{key} {old!r} there, {new!r} now" for key, (old, new) in differ.items())
        raise _usage(f"--out {out} holds an evaluation with other settings ({said}): pick another --out, "
                     "or rerun with its settings to add systems to it")
    return earlier


def _cmd_demo(args) -> int:
    from regrad_engine.demo import run_demo

    return run_demo(meta=args.meta, workdir=args.workdir, questions=args.questions, k=args.k,
                    threads=args.threads)


def _lora_config(model, settings):
    from regrad_engine.lora import default_lora_config

    config = default_lora_config(model.config.num_hidden_layers, r=settings.r, lora_alpha=settings.lora_alpha)
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


_FLAG_ALIASES = {"lora.r": ["--rank"], "lora.layers": ["--layers"]}  # the short names of earlier versions


def _config_flags(cls, prefix: str = "") -> list[tuple[str, object]]:
    """(dest, pydantic field) of every leaf field of a config class; nested models recurse."""
    from pydantic import BaseModel

    out = []
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _config_flags(field.annotation, f"{prefix}{name}.")
        else:
            out.append((prefix + name, field))
    return out


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per MetaTrainConfig field (``lora.r`` -> ``--lora-r``), typed, with its description."""
    import types
    import typing

    from regrad_engine.config import MetaTrainConfig

    for dest, field in _config_flags(MetaTrainConfig):
        parts = dest.split(".")
        name = "-".join(parts[:-1] + [parts[-1].removeprefix(parts[0] + "_")] if len(parts) > 1 else parts)
        flags = ["--" + name.replace("_", "-"), *_FLAG_ALIASES.get(dest, [])]
        kinds = [a for a in typing.get_args(field.annotation) if a is not type(None)] \
            if isinstance(field.annotation, types.UnionType) or typing.get_origin(field.annotation) is typing.Union \
            else [field.annotation]
        kind = kinds[0]
        if field.is_required():
            help_text = f"{field.description} (required, here or in --config)"
        elif field.default is not None:
            help_text = f"{field.description} (default: {field.default})"
        else:
            help_text = field.description
        options: dict = {"dest": dest, "default": None, "help": help_text, "metavar": name.upper().replace("-", "_")}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
            del options["metavar"]
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = list(typing.get_args(kind))
            del options["metavar"]
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            options["type"] = _list_of(item)
            options["metavar"] = "A,B"
        else:
            options["type"] = kind
        p.add_argument(*flags, **options)


def _list_of(item):
    def parse(text: str) -> list:
        return [item(x.strip()) for x in text.split(",") if x.strip()]

    parse.__name__ = f"comma-separated {item.__name__}"  # argparse names it in its error message
    return parse


def _config_overrides(args) -> dict:
    """The config fields given as flags, nested as the config is (``lora.r`` -> ``{"lora": {"r": ...}}``)."""
    from regrad_engine.config import MetaTrainConfig

    out: dict = {}
    for dest, _ in _config_flags(MetaTrainConfig):
        value = getattr(args, dest, None)
        if value is not None:
            *parents, leaf = dest.split(".")
            node = out
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    return out


def _storage_kind(value: str) -> str:
    from regrad_engine.compression import parse_storage

    try:
        return parse_storage(value).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regrad", description="ReGrad: retrievable gradients for RAG apps")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a seeded synthetic QA corpus about fictional entities")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--entities", type=int, default=600, help="number of fictional entities")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("data", help="pool the real QA sets of ../shared/data into one meta-training directory")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--sources", default=None, help="comma-separated subset of squad,hotpotqa,popqa,pubmedqa,policyqa,cuad")
    p.add_argument("--max-words", dest="max_words", type=int, default=120, help="words per passage")
    p.add_argument("--test-questions", dest="test_questions", type=int, default=200, help="per source")
    p.add_argument("--dev-questions", dest="dev_questions", type=int, default=50, help="per source")
    p.add_argument("--train-questions", dest="train_questions", type=int, default=1000, help="per source, at most")
    p.add_argument("--synthetic-share", dest="synthetic_share", type=float, default=0.0,
                   help="share of train/dev questions from the synthetic corpus (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("train", help="stage 1: meta-learn the LoRA initialisation and step sizes")
    p.add_argument("--config", help="JSON config file (flags override it)")
    _add_config_flags(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("build", help="stage 2: index a corpus and store its document gradients")
    p.add_argument("--corpus", help="corpus: .jsonl/.json (id, text[, title]), .txt, or a directory")
    p.add_argument("--meta", help="meta checkpoint directory (from `regrad train`)")
    p.add_argument("--store", required=True, help="store directory (bank + index)")
    p.add_argument("--chunk-tokens", dest="chunk_tokens", type=int, default=200, help="max tokens per chunk")
    p.add_argument("--storage", "--storage-dtype", dest="storage_dtype", default="bf16", type=_storage_kind,
                   metavar="KIND", help="how gradients are stored: fp32, bf16 (default), fp16, int8 (~2x smaller "
                   "than bf16), int8-rank<q> (int8 rank-q factors, e.g. int8-rank7: 4.4x smaller for LoRA rank 16; "
                   "see the README's Compressed banks)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="documents per backward pass")
    p.add_argument("--update", action="store_true", help="recompute every gradient (documents whose text changed "
                   "are recomputed without it)")
    p.add_argument("--worker", type=int, default=0, help="this worker's index (distributed builds; then `regrad merge`)")
    p.add_argument("--num-workers", dest="num_workers", type=int, default=None,
                   help="number of build workers (default 1; with --ray: models on the cluster, default one per GPU "
                        "with --device cuda, else one per --threads CPUs)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="build on a Ray cluster (pip install 'regrad[ray]'): ADDRESS as `ray start --head` prints it "
                        "(host:6379, or ray://host:10001); bare --ray: $RAY_ADDRESS, a cluster started on this "
                        "machine, else a local one. The store must be a path every node sees")
    es = p.add_argument_group("Elasticsearch instead of the embedded BM25 index (credentials: ELASTICSEARCH_API_KEY, "
                              "or ELASTICSEARCH_USERNAME and ELASTICSEARCH_PASSWORD)")
    es.add_argument("--elasticsearch", nargs="?", const="", default=None, metavar="URL",
                    help="server URL; bare --elasticsearch uses $ELASTICSEARCH_URL")
    es.add_argument("--index", default=None, help="index name (default: regrad)")
    es.add_argument("--content-field", dest="content_field", default=None, help="field with the text (default: text)")
    es.add_argument("--title-field", dest="title_field", default=None, help="field with the title (default: title)")
    es.add_argument("--id-field", dest="id_field", default=None, help="field with the document id (default: _id)")
    es.add_argument("--search-fields", dest="search_fields", default=None, metavar="A,B",
                    type=lambda s: [f.strip() for f in s.split(",") if f.strip()],
                    help="fields the query matches, boosts allowed: title^2,text (default: title,text)")
    es.add_argument("--reuse-index", dest="reuse_index", action="store_true",
                    help="the index already holds the chunks (e.g. written by langchain-elasticsearch): do not "
                         "write to it; without --corpus every document of the index is used")
    _add_model_args(p)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("delete", help="remove documents (every chunk of each) from a store's bank and index")
    p.add_argument("ids", nargs="+", metavar="ID", help="document or chunk ids")
    p.add_argument("--store", required=True, help="store directory from `regrad build`")
    p.add_argument("--compact", action="store_true", help="also rewrite the bank so the deleted gradients leave the disk")
    p.set_defaults(func=_cmd_delete)

    p = sub.add_parser("compact", help="rewrite a store's bank without deleted or replaced gradients")
    p.add_argument("--store", required=True, help="store directory from `regrad build`")
    p.set_defaults(func=_cmd_compact)

    p = sub.add_parser("verify", help="check a store: every shard and checksum, bank and index in step")
    p.add_argument("--store", required=True, help="store directory from `regrad build`")
    p.add_argument("--repair", action="store_true", help="drop damaged gradients (then `regrad build` recomputes them)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("merge", help="merge the shards of `regrad build --worker i --num-workers n` into the bank")
    p.add_argument("--store", required=True, help="store directory the workers built")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("ask", help="stage 3: answer questions with retrieved gradients")
    p.add_argument("questions", nargs="+", help="one or more questions")
    p.add_argument("--store", required=True, help="store directory from `regrad build`")
    p.add_argument("--meta", help="meta checkpoint (default: the one the store was built with)")
    p.add_argument("--mode", default="parametric", choices=["parametric", "hybrid"])
    p.add_argument("--k", type=int, default=3, help="documents per question")
    p.add_argument("--gamma", type=float, default=1.0, help="test-time step scale")
    p.add_argument("--compare", action="store_true", help="also print the base model's answer")
    _add_model_args(p)
    p.set_defaults(func=_cmd_ask)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, "
                                     "/v1/models); concurrent requests generate in batches, each with its own documents")
    p.add_argument("--store", required=True, help="store directory from `regrad build`")
    p.add_argument("--meta", help="meta checkpoint (default: the one the store was built with)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=None,
                   help="most requests generated together (default: the engine's batch size, 16)")
    p.add_argument("--max-wait-ms", dest="max_wait_ms", type=float, default=10.0,
                   help="how long a request waits for others to share its batch")
    p.add_argument("--model-id", dest="model_id", default="regrad", help="model name /v1/models lists")
    p.add_argument("--mode", default="parametric", choices=["parametric", "hybrid"], help="default of requests")
    p.add_argument("--k", type=int, default=3, help="documents per request, by default")
    p.add_argument("--gamma", type=float, default=1.0, help="test-time step scale, by default")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=None,
                   help="answer length of requests without max_tokens (default: 20)")
    _add_model_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("eval", help="score direct / RAG / ReGrad and the ablations on a QA split")
    p.add_argument("--data", required=True, help="data directory (corpus.jsonl + split files)")
    p.add_argument("--meta", required=True, help="meta checkpoint directory")
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="first N questions of each set (source) only")
    p.add_argument("--systems", default=None,
                   help="comma-separated subset of direct,rag,meta_lora,format_control,random_grads,"
                        "raw_gradients,regrad,regrad_hybrid (default: all)")
    p.add_argument("--setting", default="given", choices=["given", "retrieval"],
                   help="given: each question's gold among hard negatives; retrieval: BM25 top-k over every "
                        "passage of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=float, default=1.0,
                   help="test-time step scale of the systems that apply gradients (default: 1.0)")
    p.add_argument("--out", default=None, help="write the per-set report and per-question answers as JSON")
    _add_model_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="build a bank over a small corpus and answer questions side by side")
    p.add_argument("--meta", default=None, help="meta checkpoint (default: the shipped SmolLM2 synthetic one)")
    p.add_argument("--workdir", default="runs/demo", help="where the demo store is written")
    p.add_argument("--questions", type=int, default=6, help="how many held-out questions to ask")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_demo)
    return parser


def _os_error(err: OSError) -> str:
    import errno

    where = f" ({err.filename})" if err.filename else ""
    hints = {errno.ENOSPC: "the disk is full: free space and run the same command again (work already flushed "
                           "is kept)",
             errno.EACCES: "permission denied: run as a user who may write there, or pick another directory",
             errno.EROFS: "the file system is read-only: pick a writable directory",
             errno.EISDIR: "a directory was given where a file is expected",
             errno.ENOTDIR: "a file was given where a directory is expected"}
    return f"{err.strerror or err}{where}: " + hints.get(err.errno, "check the path and the disk")


def _check_args(args) -> None:
    """The flags every job shares, checked before any work (a model load takes a while)."""
    from regrad_engine.errors import check_k

    for name in ("k", "threads", "batch_size", "entities", "questions", "limit", "num_workers", "chunk_tokens"):
        value = getattr(args, name, None)
        if value is not None and not isinstance(value, list):  # `ask` has a list of questions of that name
            check_k(value, "--" + name.replace("_", "-"))
    if getattr(args, "device", None) is not None and getattr(args, "ray", None) is None:  # Ray: the cluster's GPUs
        check_device(args.device)


def check_device(device: str) -> None:
    """Refuse a device torch does not know or this machine does not have (ModelLoadError)."""
    import torch

    from regrad_engine.errors import ModelLoadError

    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if kind.type == "cuda" and (not torch.cuda.is_available() or (kind.index or 0) >= torch.cuda.device_count()):
        raise ModelLoadError(f"--device {device}: no such CUDA GPU is visible here; use --device cpu")
    if kind.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"--device {device!r}: regrad runs on cpu or cuda")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from regrad_engine.errors import RegradError

    if not args.verbose:  # libraries that log tracebacks or debug lines of their own
        for name in ("elastic_transport", "bm25s"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        _check_args(args)
        return args.func(args)
    except RegradError as err:
        print(f"regrad {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine, not the code: say which file and what to do
        print(f"regrad {args.command}: error: {_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
