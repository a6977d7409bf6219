"""Why documents begin with the BOS token where the tokenizer puts one: the base model's language-model
loss on real passages with it and without it.

    python benchmarks/document_bos.py --model embedded:gemma3-270m --corpus runs/general/corpus.jsonl --n 32
    python benchmarks/document_bos.py --corpus runs/general/corpus.jsonl --n 32   # SmolLM2: no BOS to add

The first ``--n`` passages of the corpus (as ``regrad data`` wrote it), each cut at the bank's
document length (``--max-tokens``); the loss is averaged over the same positions in both
encodings (every token after the passage's first), so the two figures compare directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from regrad_engine.data import DataError, read_jsonl  # noqa: E402
from regrad_engine.models import load_model  # noqa: E402
from regrad_engine.prompts import bos_prefix  # noqa: E402


def passage_losses(model, ids: list[int], prefix: list[int]) -> tuple[float, int]:
    """Summed loss of tokens ``ids[1:]`` given ``prefix + ids`` before them, and their count."""
    seq = torch.tensor([prefix + ids])
    with torch.no_grad():
        logits = model(seq).logits[0, :-1].float()
    targets = seq[0, 1:]
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    kept = losses[len(prefix):]  # drop the prediction of the passage's first token (only one encoding has it)
    return float(kept.sum()), kept.numel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as `regrad --model` (default: the embedded SmolLM2)")
    p.add_argument("--corpus", required=True, help="corpus.jsonl written by `regrad data`")
    p.add_argument("--n", type=int, default=32, help="passages")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens per passage, as the bank")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 1:
        sys.exit(f"--n {args.n}: give a number of passages of at least 1")
    corpus = Path(args.corpus)
    if corpus.is_dir():
        corpus = corpus / "corpus.jsonl"
    if not corpus.is_file():
        sys.exit(f"{corpus} does not exist: pass the corpus.jsonl (or the directory) written by `regrad data --out DIR`")
    try:
        texts = [str(row["text"]) for row in read_jsonl(corpus)[:args.n]]
    except (DataError, KeyError) as exc:
        sys.exit(f"{corpus} is not a corpus written by `regrad data` ({exc})")
    loaded = load_model(args.model)
    tok, bos = loaded.tokenizer, bos_prefix(loaded.tokenizer)
    print(f"model {loaded.name}: the tokenizer begins text with BOS: {bool(bos)} "
          f"({tok.bos_token!r}, id {tok.bos_token_id})")
    if not bos and tok.bos_token_id is not None:
        bos_used = [tok.bos_token_id]  # not what regrad does for this model; measured to show why
    else:
        bos_used = bos
    encoded = [tok(text, add_special_tokens=False)["input_ids"][:args.max_tokens] for text in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]  # one token has nothing after it to predict
    if not encoded:
        sys.exit(f"{corpus}: no passage of 2 or more tokens among the first {args.n}")
    totals = {"with BOS": [0.0, 0], "without BOS": [0.0, 0]}
    for ids in encoded:
        for name, prefix in (("with BOS", bos_used), ("without BOS", [])):
            loss, count = passage_losses(loaded.model, ids, prefix)
            totals[name][0] += loss
            totals[name][1] += count
    for name, (loss, count) in totals.items():
        print(f"{name:12s} {loss / count:.3f} nats per token ({count} tokens, {len(encoded)} passages)")
    print(f"regrad encodes this model's documents {'with' if bos else 'without'} BOS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
