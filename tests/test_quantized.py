"""LoRA-FA on bitsandbytes 4-bit and 8-bit layers: math, memory, training, merging, PEFT interop."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lorafa_scale import (
    AdapterFormatError,
    ConfigError,
    LoraConfig,
    LoraFALinear,
    LoraFAModel,
    get_peft_model,
)
from lorafa_scale.backends import find_backend
from lorafa_scale.cli import main as cli
from lorafa_scale.merge import export_merged
from lorafa_scale.quantization import load_model, merge_and_unload
from tests.test_layer import OneLinear, activation_bytes
from tests.test_model import ids, logits, train_b
from tests.tiny_models import save_tiny_llama, tiny_llama

IN, OUT, R, ALPHA = 256, 512, 16, 32
# (kind, compute dtype, quant_storage, double quantization); a bf16 quant_storage is the ZeRO-3 / FSDP setting.
QUANTIZED = [
    ("nf4", torch.float32, torch.uint8, True),
    ("nf4", torch.bfloat16, torch.bfloat16, True),
    ("fp4", torch.float32, torch.uint8, False),
    ("fp4", torch.float16, torch.uint8, True),
    ("int8", torch.float32, None, None),
]
# Forward tolerance relative to the output's largest value: float rounding of the compute dtype over a
# 256-long dot product, against a float64 reference that uses the same dequantized weight.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def quantized_linear(kind, compute_dtype, quant_storage, double_quant, seed=0):
    """A real bitsandbytes layer holding a random weight, quantized the way from_pretrained does."""
    weight = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed)) * 0.05
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(IN, OUT, bias=True, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        options = dict(quant_type=kind, compress_statistics=double_quant, quant_storage=quant_storage)
        layer = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=compute_dtype, **options)
        layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False, module=layer, **options)
    layer.bias.data = torch.randn(OUT, generator=torch.Generator().manual_seed(seed + 1)).to(compute_dtype) * 0.1
    layer.bias.requires_grad_(False)
    return layer.to("cpu")


@pytest.mark.parametrize("kind, compute_dtype, quant_storage, double_quant", QUANTIZED)
def test_forward_and_b_gradient_match_dequantized_float64(kind, compute_dtype, quant_storage, double_quant):
    base = quantized_linear(kind, compute_dtype, quant_storage, double_quant)
    backend = find_backend(base)
    assert backend.name == ("bnb_8bit" if kind == "int8" else "bnb_4bit")
    torch.manual_seed(0)
    layer = LoraFALinear(base, backend, R, ALPHA, init_lora_weights=False).train()  # B random: adapter is non-zero
    x = torch.randn(3, 20, IN).to(compute_dtype).requires_grad_(True)
    grad_out = torch.randn(3, 20, OUT).to(compute_dtype)
    y = layer(x)
    y.backward(grad_out)

    w = backend.dequantized_weight(base).double()
    a = layer.lora_A.weight.detach().double()
    b = layer.lora_B.weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y64 = x64 @ w.T + base.bias.double() + layer.scaling * (x64 @ a.T) @ b.T
    y64.backward(grad_out.double())
    g_b64 = b.grad @ torch.linalg.inv(a @ a.T) / layer.scaling**2  # LoRA-FA's corrected B gradient

    tol = TOLERANCE[compute_dtype]
    assert y.dtype == compute_dtype
    assert (y.double() - y64).abs().max() <= tol * y64.abs().max()
    assert (x.grad.double() - x64.grad).abs().max() <= tol * x64.grad.abs().max()
    g_b = layer.lora_B.weight.grad.double()
    assert (g_b - g_b64).abs().max() <= tol * g_b64.abs().max()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_saved_bytes_vs_peft_lora_on_the_same_quantized_layer(kind):
    """Neither the quantized matmul nor the adapter keeps the input; PEFT's LoRA keeps it (and a mask)."""
    tokens = 4 * 64
    x = torch.randn(4, 64, IN, requires_grad=True)
    holder = OneLinear()
    holder.proj = quantized_linear(kind, torch.float32, torch.uint8, True)
    base_only, _ = activation_bytes(lambda: holder(x), holder)
    ours = LoraFALinear(holder.proj, find_backend(holder.proj), R, ALPHA, lora_dropout=0.05).train()
    ours_bytes, _ = activation_bytes(lambda: ours(x), ours)

    theirs = peft.get_peft_model(holder, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.05,
                                                         target_modules=["proj"])).train()
    assert type(theirs.base_model.model.proj.base_layer) is type(ours.base_layer)  # PEFT's bnb layer, same base
    theirs_bytes, _ = activation_bytes(lambda: theirs(x), theirs)

    assert base_only == 0
    assert ours_bytes == tokens * R * 4  # only the fp32 projection A x
    # PEFT keeps dropout's mask and dropout(x), each as large as x, plus A's output.
    assert theirs_bytes >= 2 * tokens * IN * 4
    assert ours_bytes * 20 < theirs_bytes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def config():
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")


def loss(model):
    x = ids()
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


@pytest.fixture(scope="module")
def trained_nf4(checkpoint, tmp_path_factory):
    """A LoRA-FA adapter trained a few steps on the nf4-loaded tiny Llama, saved in PEFT's format."""
    model = load_model(checkpoint, "nf4", torch.float32, config())
    before = loss(model.train())
    train_b(model, steps=5)
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter_dir)
    return model, adapter_dir, before


def test_nf4_training_lowers_loss_and_counts_like_peft(trained_nf4, checkpoint):
    model, _, before = trained_nf4
    assert loss(model.train()) < before - 0.1
    assert all(type(m.base_layer) is bnb.nn.Linear4bit for m in model.lora_layers())
    trainable = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_B"}
    # Same parameter counts as PEFT on the same 4-bit model (plain LoRA here, so A is trainable in both).
    plain = load_model(checkpoint, "nf4", torch.float32, LoraConfig(r=8, lora_alpha=16, use_fast_adapter=False,
                                                                    target_modules="all-linear"))
    theirs = peft.get_peft_model(load_model(checkpoint, "nf4", torch.float32),
                                 peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert plain.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_int8_training_lowers_loss(checkpoint):
    model = load_model(checkpoint, "int8", torch.float32, config())
    assert all(type(m.base_layer) is bnb.nn.Linear8bitLt for m in model.lora_layers())
    before = loss(model.train())
    train_b(model, steps=5)
    assert loss(model.train()) < before - 0.1


def test_adapter_trained_on_nf4_loads_in_peft_with_same_logits(trained_nf4, checkpoint):
    model, adapter_dir, _ = trained_nf4
    theirs = peft.PeftModel.from_pretrained(load_model(checkpoint, "nf4", torch.float32), adapter_dir)
    torch.testing.assert_close(logits(theirs.eval()), logits(model.eval()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized_by", ["load_model", "user"])
def test_an_evaluation_pass_does_not_change_training_gradients(checkpoint, quantized_by):
    """bitsandbytes' CPU bf16 inference repack (AVX512-BF16 machines) has no backward; the bitsandbytes backend
    turns it off in every 4-bit layer of a model get_peft_model adapts, also for a model the user quantized
    and for layers that are not adapted but that gradients flow through (only q_proj is adapted there)."""

    def b_gradients(evaluate_first):
        torch.manual_seed(0)
        if quantized_by == "load_model":
            model = load_model(checkpoint, "nf4", torch.float32, LoraConfig(
                r=8, lora_alpha=16, init_lora_weights=False, target_modules="all-linear"))
        else:
            base = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu", quantization_config=(
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)))
            model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                    target_modules=["q_proj"]))
        if evaluate_first:
            logits(model.eval())
        x = ids()
        model.train()(input_ids=x, labels=x).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for fresh, after_eval in zip(b_gradients(False), b_gradients(True), strict=True):
        torch.testing.assert_close(after_eval, fresh, rtol=0, atol=0)


def test_bf16_load_upcasts_only_what_is_trained(checkpoint):
    model = load_model(checkpoint, "nf4", "bf16", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"],
                                                             modules_to_save=["lm_head"]))
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.dtype == torch.float32, name
        elif "lora_A" not in name:  # 4-bit weights too: packed in bf16 so ZeRO-3 / FSDP can shard them
            assert param.dtype == torch.bfloat16, name
    # The fp32 head copy computes in fp32 and hands bf16 on, so the bf16 model trains around it.
    x = ids()
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert head.grad.dtype == torch.float32 and head.grad.abs().max() > 0
    # PEFT's prepare_model_for_kbit_training upcasts every frozen bf16 parameter.
    theirs = peft.prepare_model_for_kbit_training(load_model(checkpoint, "nf4", "bf16"))
    assert theirs.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("kind, layer_type", [("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)])
def test_merge_requantizes_and_reports_rounding_error(checkpoint, kind, layer_type):
    model = load_model(checkpoint, kind, torch.float32, config())
    train_b(model, steps=2)
    layer = model.lora_layers()[0]
    backend, base = layer.backend, layer.base_layer
    delta = layer.delta_weight().detach().double()
    expected = backend.dequantized_weight(base).double() + delta
    x = torch.randn(5, base.in_features)
    with torch.no_grad():
        before = base(x)
    merged, errors = merge_and_unload(model)
    assert len(errors) == 14 and type(merged.model.layers[0].mlp.up_proj) is layer_type
    # The merged layer holds W + s B A rounded to the quantization grid; the reported error is that rounding.
    rounded = backend.dequantized_weight(base).double()
    assert errors[next(iter(errors))] == pytest.approx(float((rounded - expected).norm() / delta.norm()), rel=1e-9)
    assert 0 < (rounded - expected).abs().max() <= 0.2 * expected.abs().max()  # a grid step, not garbage
    # ... and computes with it, no stale quantization state (int8 also rounds x to 8 bits: looser).
    with torch.no_grad():
        after = base(x)
    torch.testing.assert_close(after.double(), x.double() @ rounded.T, rtol=0, atol=1e-4 if kind == "nf4" else 1e-2)
    assert not torch.equal(after, before)


def merged_tensors(directory):
    return {k: v for shard in sorted(Path(directory).glob("*.safetensors")) for k, v in load_file(str(shard)).items()}


def test_merge_command_adds_the_delta_shard_by_shard(trained_nf4, checkpoint, tmp_path, capsys):
    model, adapter_dir, _ = trained_nf4
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(checkpoint).save_pretrained(sharded, max_shard_size="100KB")
    out = tmp_path / "merged"
    assert cli(["merge", str(adapter_dir), str(sharded), str(out)]) == 0
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_text() == (sharded / "model.safetensors.index.json").read_text()
    merged, base = merged_tensors(out), merged_tensors(sharded)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    key = "model.layers.1.self_attn.v_proj.weight"
    expected = base[key].double() + layer.delta_weight().detach().double()  # W + s B A, in W's fp32
    torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    with pytest.raises(FileExistsError, match="merged"):
        export_merged(adapter_dir, sharded, out)
    capsys.readouterr()
    assert cli(["merge", str(adapter_dir), str(sharded), str(out)]) == 2  # nothing overwritten
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("lorafa-scale merge: error:")


def test_export_merged_onto_the_trained_nf4_weights_gives_the_trained_logits(trained_nf4, checkpoint, tmp_path):
    model, adapter_dir, _ = trained_nf4
    out = export_merged(adapter_dir, checkpoint, tmp_path / "merged", quantization="nf4", dtype="fp32")
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    expected = layer.backend.dequantized_weight(layer.base_layer).double() + layer.delta_weight().detach().double()
    merged = merged_tensors(out)["model.layers.1.self_attn.v_proj.weight"]
    torch.testing.assert_close(merged.double(), expected, rtol=0, atol=1e-6)  # the round trip is the loaded nf4
    full = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(full), logits(model.eval()), rtol=1e-4, atol=1e-4)


def test_export_merged_onto_int8_weights_matches_the_loaded_int8_layer(trained_nf4, checkpoint, tmp_path):
    _, adapter_dir, _ = trained_nf4  # any adapter of this geometry: only its delta matters here
    out = export_merged(adapter_dir, checkpoint, tmp_path / "merged", quantization="int8", dtype="fp32")
    model = LoraFAModel.from_pretrained(load_model(checkpoint, "int8", torch.float32), adapter_dir)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    key = "model.layers.0.self_attn.v_proj.weight"
    assert type(layer.base_layer) is bnb.nn.Linear8bitLt
    expected = layer.backend.dequantized_weight(layer.base_layer).double() + layer.delta_weight().detach().double()
    torch.testing.assert_close(merged_tensors(out)[key].double(), expected, rtol=0, atol=1e-6)


def test_merge_refuses_an_adapter_of_another_model_before_writing(checkpoint, tmp_path):
    other = get_peft_model(tiny_llama(hidden_size=32), LoraConfig(r=4, target_modules=["q_proj"]))
    other.save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterFormatError, match=r"q_proj.weight is \[32, 32\] in the adapter but \[64, 64\]"):
        export_merged(tmp_path / "adapter", checkpoint, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()


def test_bad_quantization_settings_fail_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="quantization must be one of"):
        load_model(tmp_path, "int4")
    with pytest.raises(ConfigError, match="quant_storage applies to 4-bit"):
        load_model(tmp_path, "int8", quant_storage="bf16")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        load_model(tmp_path, "nf4", "float8")
    with pytest.raises(ConfigError, match="config.json"):
        load_model(tmp_path, "nf4")
