"""The adaptation code on CUDA: parity with CPU maths, bf16 paths, batched generation.

Skipped without a CUDA device (CI has none); run on a lent GPU with `pytest -m gpu`."""

import pytest
import torch

from regrad_engine.gradients import document_gradients, model_loss
from regrad_engine.lora import apply_update, init_step_sizes
from regrad_engine.meta import MetaExample, meta_loss
from regrad_engine.prompts import encode_documents
from tests.conftest import DOCS, make_engine, make_model, make_space, random_phi

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU tests need one")]
TEXTS = list(DOCS.values())


def _to(tensors, device, dtype=None):
    return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in tensors.items()}


def test_per_document_gradients_on_cuda_match_cpu(tokenizer):
    cpu_model = make_model(tokenizer, attn="sdpa")
    gpu_model = make_model(tokenizer, attn="sdpa").cuda()
    cpu_space, gpu_space = make_space(cpu_model), make_space(gpu_model)
    phi = random_phi(cpu_space)
    batch = encode_documents(tokenizer, TEXTS)
    on_cpu = document_gradients(cpu_model, cpu_space, phi, batch)
    on_gpu = document_gradients(gpu_model, gpu_space, _to(phi, "cuda"), _to(batch, "cuda"))
    for key in on_cpu:
        # float64 on both; only the reduction order differs (GPU kernels sum in another order)
        torch.testing.assert_close(on_gpu[key].cpu(), on_cpu[key], rtol=1e-5, atol=1e-7)


def test_bf16_model_runs_factors_and_gradients_close_to_fp32(tokenizer):
    model32 = make_model(tokenizer, dtype=torch.float32, attn="sdpa").cuda()
    model16 = make_model(tokenizer, dtype=torch.bfloat16, attn="sdpa").cuda()
    space32, space16 = make_space(model32), make_space(model16)
    phi = _to(random_phi(space32, dtype=torch.float32), "cuda")
    batch = _to(encode_documents(tokenizer, TEXTS), "cuda")
    g32 = document_gradients(model32, space32, phi, batch)
    g16 = document_gradients(model16, space16, phi, batch)
    for key in g32:
        cosine = torch.nn.functional.cosine_similarity(g32[key].flatten(1), g16[key].flatten(1).float(), dim=1)
        assert (cosine > 0.95).all(), (key, cosine)
    adapted = apply_update(phi, {k: v.float() for k, v in g16.items()}, init_step_sizes(phi, "tie", 1.0))
    assert torch.isfinite(model_loss(model16, space16, adapted, batch)).all()


def test_meta_step_under_bf16_autocast_is_finite_and_differentiable(tokenizer):
    model = make_model(tokenizer, dtype=torch.float32, attn="eager").cuda()
    space = make_space(model)
    phi = {k: v.requires_grad_(True) for k, v in _to(random_phi(space, dtype=torch.float32), "cuda").items()}
    alpha = {k: v.requires_grad_(True) for k, v in init_step_sizes(phi, "tie", 1.0).items()}
    tasks = [MetaExample("Where was Velmora Quistan born?", ["Lisbon"], TEXTS[:2]),
             MetaExample("Where is the Fudral Bureau based?", ["Tokyo"], TEXTS[1:3])]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = meta_loss(model, tokenizer, space, phi, alpha, tasks)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in list(phi.values()) + list(alpha.values()))


def test_batched_generation_equals_one_at_a_time_on_cuda(tokenizer, tmp_path):
    model = make_model(tokenizer, attn="sdpa").cuda()
    engine = make_engine(tokenizer, tmp_path, model=model)
    questions = ["Where was Velmora Quistan born?", "Which river does Ailpelou lie on?",
                 "Where is the Fudral Bureau based?"]
    for mode in ("parametric", "hybrid"):
        together = engine.answer_batch(questions, mode=mode)
        for answer in together:
            assert engine.answer(answer.question, mode=mode).text == answer.text


def _deep_space(model):
    """LoRA on both layers' MLPs: the double backward runs through layer 1's attention."""
    from peft import LoraConfig

    from regrad_engine.lora import LoraSpace

    return LoraSpace(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                                       layers_to_transform=[0, 1], layers_pattern="layers", lora_dropout=0.0))


def _meta_gradient(model, tokenizer, space, phi0, tasks, **options):
    phi = {k: v.clone().requires_grad_(True) for k, v in phi0.items()}
    alpha = {k: v.requires_grad_(True) for k, v in init_step_sizes(phi, "tie", 1.0).items()}
    meta_loss(model, tokenizer, space, phi, alpha, tasks, mode="mixed", **options).backward()
    return [p.grad for p in [*phi.values(), *alpha.values()]]


def test_meta_gradient_on_cuda_sdpa_with_checkpointing_and_chunked_loss_equals_eager_plain(tokenizer):
    """On CUDA the fused SDPA kernels have no double backward and recomputation runs in autograd's
    own threads: the sdpa model (math backend in the inner pass, fused kernels in the outer one),
    checkpointed, with the chunked loss, gives the eager model's plain meta-gradient."""
    models = {attn: make_model(tokenizer, dtype=torch.float32, attn=attn).cuda() for attn in ("sdpa", "eager")}
    spaces = {attn: _deep_space(m) for attn, m in models.items()}
    phi = _to(random_phi(spaces["eager"], dtype=torch.float32), "cuda")
    tasks = [MetaExample("Where was Velmora Quistan born?", ["Lisbon"], TEXTS[:2]),
             MetaExample("Where is the Fudral Bureau based?", ["Tokyo"], TEXTS[1:3])]
    plain = _meta_gradient(models["eager"], tokenizer, spaces["eager"], phi, tasks, loss_chunk=0)
    lean = _meta_gradient(models["sdpa"], tokenizer, spaces["sdpa"], phi, tasks, loss_chunk=5, checkpoint_layers=True)
    for got, want in zip(lean, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = _meta_gradient(models["sdpa"], tokenizer, spaces["sdpa"], phi, tasks, checkpoint_layers=True)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in bf16)
