"""Lean mode against the unmodified Hugging Face model: the loss and every trainable gradient, per family."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lorafa_scale import LoraConfig, get_peft_model, lean
from tests.tiny_models import tiny_gpt2

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=150, max_position_embeddings=128)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}  # relative to each gradient's largest value


def tiny(family: str, dtype=torch.float32, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides}))
    return model.to(dtype).train()


def wrapped(base, lean_on: bool, dropout: float = 0.05, checkpointing: bool = False):
    base = copy.deepcopy(base)
    if checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)  # the same A (and random B: init_lora_weights=False) for both
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config, lean=lean_on).train()


def batch(vocab: int = 150):
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (3, 29), generator=generator)
    labels = ids.clone()
    labels[0, :7] = -100        # a prompt
    labels[1] = -100            # a sequence with every label ignored
    labels[2, -5:] = -100       # padding at the end
    return ids, labels


def loss_and_grads(model, ids, labels, **kwargs):
    torch.manual_seed(3)  # dropout seeds
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_close(reference, lean_out, dtype):
    (ref_out, ref_grads), (out, grads) = reference, lean_out
    tol = TOLERANCE[dtype]
    assert out.logits is None
    assert torch.allclose(out.loss.float(), ref_out.loss.float(), rtol=tol, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in ref_grads.items():
        scale = grad.abs().max()
        assert scale > 0, name
        assert (grads[name] - grad).abs().max() <= tol * scale, name


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_and_gradients_equal_unmodified(family, dtype):
    base = tiny(family, dtype)
    ids, labels = batch()
    reference = loss_and_grads(wrapped(base, False), ids, labels)
    assert_close(reference, loss_and_grads(wrapped(base, True), ids, labels), dtype)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_with_activation_checkpointing(family):
    base = tiny(family)
    ids, labels = batch()
    reference = loss_and_grads(wrapped(base, False), ids, labels)
    assert_close(reference, loss_and_grads(wrapped(base, True, checkpointing=True), ids, labels), torch.float32)


def test_reentrant_checkpointing_and_hf_conventions():
    base = tiny("llama")
    ids, labels = batch()
    reference = loss_and_grads(wrapped(base, False), ids, labels, num_items_in_batch=11)
    model = copy.deepcopy(base)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, config, lean=True).train()
    assert_close(reference, loss_and_grads(model, ids, labels, num_items_in_batch=11), torch.float32)
    # shift_labels given already shifted, and return_dict=False
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.manual_seed(3)
    out = model(input_ids=ids, shift_labels=shifted, return_dict=False)
    assert isinstance(out, tuple) and torch.allclose(out[0], reference[0].loss * 11 / (labels[:, 1:] != -100).sum())


def test_eval_and_no_labels_use_transformers_forward():
    base = tiny("llama")
    ids, labels = batch()
    model = wrapped(base, True)
    assert lean.is_lean(model) and not lean.is_lean(wrapped(base, False))
    assert model(input_ids=ids).logits.shape == (3, 29, 150)  # no labels: logits
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        ref = wrapped(base, False).eval()(input_ids=ids, labels=labels)
    assert out.logits is not None and torch.allclose(out.loss, ref.loss, rtol=1e-6)
    # names, classes and the saved architecture are unchanged; remove() restores the original classes
    hf = model.get_base_model()
    assert type(hf).__name__ == "LlamaForCausalLM" and isinstance(hf, LlamaForCausalLM)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in wrapped(base, False).named_parameters()}
    lean.remove(model)
    assert not lean.is_lean(model) and type(hf) is LlamaForCausalLM


def test_unsupported_model_is_left_alone(caplog):
    model = tiny_gpt2()
    with caplog.at_level(logging.WARNING, logger="lorafa_scale.lean"):
        assert lean.apply(model) is False
    assert "not one of" in caplog.text and not lean.is_lean(model)


def test_eager_attention_switched_to_sdpa():
    base = tiny("llama", attn_implementation="eager")
    assert base.config._attn_implementation == "eager"
    ids, labels = batch()
    reference = loss_and_grads(wrapped(base, False), ids, labels)
    model = wrapped(base, True)
    assert model.config._attn_implementation == "sdpa"
    assert_close(reference, loss_and_grads(model, ids, labels), torch.float32)


def test_under_autocast():
    base = tiny("qwen3")
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = loss_and_grads(wrapped(base, False), ids, labels)
        got = loss_and_grads(wrapped(base, True), ids, labels)
    assert_close(reference, got, torch.bfloat16)


def test_nf4_base(tmp_path):
    from lorafa_scale.quantization import load_model
    from tests.tiny_models import save_tiny_llama

    checkpoint = save_tiny_llama(tmp_path / "model", vocab_size=150)
    ids, labels = batch()
    runs = []
    for lean_on in (False, True):
        torch.manual_seed(1)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", init_lora_weights=False)
        model = load_model(checkpoint, "nf4", torch.float32, config).train()
        if lean_on:
            assert lean.apply(model)
        runs.append(loss_and_grads(model, ids, labels))
    assert_close(runs[0], runs[1], torch.float32)
