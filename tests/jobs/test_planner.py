"""The memory planner: its activation term against saved_tensors_hooks on real training steps, and its CLI."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from lorafa_scale import LoraConfig, get_peft_model
from lorafa_scale.config import ConfigError
from lorafa_scale.jobs.planner import (
    ALL_TARGETS,
    GiB,
    Job,
    kept_for_backward,
    load_geometry,
    main,
    measure_kept_bytes,
    plan,
    seed_table,
)
from lorafa_scale.jobs.presets import GEOMETRIES, ModelGeometry
from tests.tiny_models import tiny_llama

# (hidden, intermediate, layers, heads, kv heads, vocab): GQA, MHA, one layer with a single KV head
SMALL_GEOMETRIES = [(64, 160, 2, 4, 2, 128), (96, 256, 3, 6, 6, 300), (128, 352, 1, 8, 1, 200)]
CASES = [  # (method, dropout, dtype, targets)
    ("lorafa", 0.05, "fp32", ALL_TARGETS),
    ("lora", 0.05, "fp32", ALL_TARGETS),
    ("lorafa", 0.1, "bf16", ALL_TARGETS),
    ("lora", 0.1, "bf16", ALL_TARGETS),
    ("lora", 0.0, "fp32", ("o_proj", "down_proj")),
    ("lorafa", 0.0, "bf16", ("q_proj", "v_proj")),
]
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def adapted_model(geometry, method, dropout, dtype, targets, r):
    """Ours for LoRA-FA, PEFT itself for LoRA (the planner's "lora" is PEFT's layout)."""
    hidden, ffn, layers, heads, kv_heads, vocab = geometry
    model = tiny_llama(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab)
    model = model.to(TORCH_DTYPES[dtype])
    if method == "lorafa":
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets))
        return get_peft_model(model, config).train()
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets))
    return peft.get_peft_model(model, config).train()


@pytest.mark.parametrize("geometry", SMALL_GEOMETRIES, ids=lambda g: f"h{g[0]}")
@pytest.mark.parametrize("method,dropout,dtype,targets", CASES, ids=lambda v: str(v) if not isinstance(v, tuple) else f"{len(v)}t")
def test_activation_term_matches_saved_tensors(geometry, method, dropout, dtype, targets):
    hidden, ffn, layers, heads, kv_heads, vocab = geometry
    batch, seq, r = 2, 40, 8
    torch.manual_seed(1)
    model = adapted_model(geometry, method, dropout, dtype, targets, r)
    ids = torch.randint(0, vocab, (batch, seq))
    measured = measure_kept_bytes(lambda: model(input_ids=ids, labels=ids).loss, model)
    assert any(p.grad is not None for p in model.parameters())  # a real training step ran
    job = Job(ModelGeometry("tiny", hidden, ffn, layers, heads, kv_heads, vocab, 256), micro_batch=batch,
              seq_len=seq, r=r, targets=targets, method=method, lora_dropout=dropout, dtype=dtype, device="cpu")
    predicted = kept_for_backward(job)
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_lorafa_keeps_less_than_lora_and_sharding_divides_weights():
    geometry = GEOMETRIES["llama-2-70b"]
    lorafa = plan(Job(geometry, "zero3", "nf4", gpus_per_node=8, seq_len=4096, lora_dropout=0.05))
    lora = plan(Job(geometry, "zero3", "nf4", gpus_per_node=8, seq_len=4096, lora_dropout=0.05, method="lora"))
    assert lorafa.gpu["activations"] < lora.gpu["activations"] / 1.4
    single = plan(Job(geometry, "single", "nf4", seq_len=4096))
    assert lorafa.gpu["base weights"] == pytest.approx(single.gpu["base weights"] / 8, abs=8)
    assert not single.fits and single.gpu["base weights"] > 30 * GiB  # 70B in nf4 is about 35 GB
    offload = plan(Job(geometry, "fsdp2-offload", "nf4", gpus_per_node=2))
    assert offload.gpu["base weights"] == 0  # both GPUs on one node: its CPU holds the whole base
    assert offload.cpu_per_node["base weights"] == pytest.approx(single.gpu["base weights"], abs=8)
    checkpointed = plan(Job(geometry, gradient_checkpointing=True, seq_len=4096))
    assert checkpointed.gpu["activations"] < plan(Job(geometry, seq_len=4096)).gpu["activations"]


def test_seed_table_7b_matches_the_card():
    row = next(r for r in seed_table(16, ("q_proj", "v_proj")) if r["model"] == "llama-2-7b")
    assert row["adapter_parameters"] == 32 * 2 * (4096 * 16 + 16 * 4096)  # 8.4M, the seed's 7B row
    assert round(row["adapter_file_bytes"] / 1e6) == 34


def test_config_json_geometry_and_errors(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    geometry = load_geometry(str(tmp_path))
    assert (geometry.hidden_size, geometry.num_key_value_heads) == (model.config.hidden_size, 2)
    assert geometry.num_parameters() == sum(p.numel() for p in model.parameters())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="intermediate_size"):
        load_geometry(str(bad))
    with pytest.raises(ConfigError, match="llama-2-7b"):
        load_geometry("llama-2-7")
    with pytest.raises(ConfigError, match="micro_batch"):
        Job(geometry, micro_batch=0)
    with pytest.raises(ConfigError, match="int8"):
        Job(geometry, "zero3", "int8")


def test_cli_text_json_and_exit_codes(capsys):
    assert main(["llama-3-8b", "--strategy", "zero3", "--gpus-per-node", "8", "--seq-len", "4096"]) == 0
    text = capsys.readouterr().out
    assert "activations" in text and "fits in 80 GiB" in text
    assert main(["llama-3-70b", "--json", "--gpu-memory-gib", "24"]) == 1  # 140 GB of bf16 weights on one GPU
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] is False and result["gpu_bytes"]["base weights"] > 130e9
    assert main(["no-such-model"]) == 2
    assert "lorafa-scale plan: 'no-such-model' is neither a preset" in capsys.readouterr().err
    assert main(["--seed-table"]) == 0
    assert "| llama-2-70b |" in capsys.readouterr().out
