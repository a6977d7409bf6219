"""Shared fixtures: a tiny deterministic Llama with a real (byte-level BPE) tokenizer and a chat template."""

from __future__ import annotations

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "Velmora Quistan is a dentist who was born in Lisbon. She plays the violin.",
    "Question: Where was Gredin Quibiku born? Answer with a short phrase only.",
    "Context: The Fudral Bureau is based in Tokyo and sells most of its products in Sweden.",
    "Ailpelou lies on the Yangtze river. It has handball as its most popular sport.",
    "The quick brown fox jumps over the lazy dog 0123456789 times, again and again.",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(TRAINING_TEXT * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=None, eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(tokenizer, *, layers: int = 2, hidden: int = 64, dtype=torch.float64, seed: int = 0,
               attn: str = "eager"):
    """Eager attention has the double backward; left-padded float64 generation needs sdpa
    (transformers' eager float64 mask lets padded rows degenerate)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.config._attn_implementation = attn
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture()
def sdpa_model(tokenizer):
    return make_model(tokenizer, attn="sdpa")


def make_space(model):
    from peft import LoraConfig

    from regrad_engine.lora import LoraSpace

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                        layers_to_transform=[1], layers_pattern="layers", lora_dropout=0.0)
    return LoraSpace(model, config)


@pytest.fixture()
def space(tiny_model):
    space = make_space(tiny_model)
    yield space
    space.remove()


def random_phi(space, seed: int = 1, dtype=torch.float64):
    """Factors with non-zero B, so gradients flow into A as well."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=gen) * 0.1).to(dtype) for k, s in space.shapes.items()}


DOCS = {
    "velmora": "Velmora Quistan is a dentist who was born in Lisbon. She plays the violin.",
    "fudral": "The Fudral Bureau is based in Tokyo and sells most of its products in Sweden.",
    "ailpelou": "Ailpelou lies on the Yangtze river. It has handball as its most popular sport.",
    "gredin": "Gredin Quibiku was born in Toronto and speaks Japanese at home.",
    "fox": "The quick brown fox jumps over the lazy dog again and again.",
}
IN_BANK = ["velmora", "fudral", "ailpelou", "gredin"]  # "fox" has no stored gradient
QUESTIONS = ["Where was Velmora Quistan born?", "Where is the Fudral Bureau based?",
             "Which river does Ailpelou lie on?", "What does Gredin Quibiku speak?"]


def make_loaded_with_meta(tokenizer, meta_dir):
    """A tiny model as ``load_model`` returns it, and a random meta checkpoint for it saved at ``meta_dir``."""
    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.lora import init_step_sizes
    from regrad_engine.models import LoadedModel, model_fingerprint

    model = make_model(tokenizer, attn="sdpa")
    space = make_space(model)
    phi = random_phi(space)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="tiny", fingerprint=model_fingerprint(model))
    MetaCheckpoint(phi=phi, alpha=init_step_sizes(phi, "tie", 1.0), alpha_mode="tie", lora=space.spec(),
                   base_model="tiny", base_fingerprint=loaded.fingerprint).save(meta_dir)
    return loaded


def make_engine(tokenizer, root, model=None):
    """A tiny ReGrad engine over DOCS: sdpa float64 (batched == one at a time exactly),
    random meta factors, BM25 index of all DOCS, an fp32 bank of all but "fox"."""
    from regrad_engine.bank import GradientBank
    from regrad_engine.checkpoint import MetaCheckpoint
    from regrad_engine.chunking import Chunk
    from regrad_engine.inference import ReGrad
    from regrad_engine.lora import init_step_sizes
    from regrad_engine.retrieval import BM25Index
    from regrad_engine.store import add_gradients

    model = model if model is not None else make_model(tokenizer, attn="sdpa")
    space = make_space(model)
    phi = random_phi(space)
    meta = MetaCheckpoint(phi=phi, alpha=init_step_sizes(phi, "tie", 2.0), alpha_mode="tie", lora=space.spec(),
                          base_model="tiny", base_fingerprint="f00")
    chunks = [Chunk(id=i, text=t, source_id=i, index=0, metadata={"title": i}) for i, t in DOCS.items()]
    index = BM25Index.create(root / "index")
    index.add(chunks)
    bank = GradientBank.create(root / "bank", binding={"m": "tiny"}, shapes=space.shapes, storage_dtype="fp32")
    add_gradients(model, tokenizer, space, phi, [c for c in chunks if c.id in IN_BANK], bank, progress=False)
    return ReGrad(model, tokenizer, space, meta, retriever=index, bank=bank, k=2, max_new_tokens=6)


class ScriptedLogits:
    """Logits processor that forces the tokens of ``script``, one per step, then eos."""

    def __init__(self, script, eos):
        self.script, self.eos, self.step = list(script), eos, 0

    def __call__(self, input_ids, scores):
        wanted = self.script[self.step] if self.step < len(self.script) else self.eos
        self.step += 1
        forced = torch.full_like(scores, -1e9)
        forced[:, wanted] = 0.0
        return forced


def runaway_turn(tokenizer):
    """A model that opens a new turn instead of closing its own: 'yes<|im_start|>system yes'."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    script = ids("yes") + [tokenizer.convert_tokens_to_ids("<|im_start|>")] + ids("system") + ids("yes")
    return ScriptedLogits(script, tokenizer.eos_token_id)


def force_runaway_turns(monkeypatch, engine):
    """Every generation of ``engine``'s model from now on (until the test ends) runs away past
    its turn as :func:`runaway_turn` does: for adapters that pass no generate arguments through."""
    from transformers import LogitsProcessorList

    generate = engine.model.generate

    def runaway(*args, **kwargs):
        return generate(*args, **{**kwargs, "logits_processor": LogitsProcessorList([runaway_turn(engine.tokenizer)])})

    monkeypatch.setattr(engine.model, "generate", runaway)
