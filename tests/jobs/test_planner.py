"""The memory planner: its activation term against saved_tensors_hooks on real training steps, and its CLI."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch

from lorafa_scale import LoraConfig, calibrate, get_peft_model
from lorafa_scale.config import ConfigError
from lorafa_scale.fast_adapter import DEFAULT_OVERSAMPLE, GradientSketch
from lorafa_scale.jobs.planner import (
    ALL_TARGETS,
    GiB,
    Job,
    calibration_bytes,
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


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("targets", [ALL_TARGETS, ("q_proj", "v_proj"), ("o_proj", "down_proj")],
                         ids=["all", "qv", "o-down"])
def test_calibration_term_matches_what_calibrate_holds(dtype, targets):
    """What autograd keeps during calibrate's real passes, plus the layer inputs its hooks hold."""
    hidden, ffn, layers, heads, kv_heads, vocab = SMALL_GEOMETRIES[0]
    batch, seq, r = 2, 40, 8
    model = tiny_llama(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=list(targets), fast_adapter_rank=4)
    model = get_peft_model(model.to(TORCH_DTYPES[dtype]), config).train()
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    held = {}

    def record(tensor):
        held[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    def loss_fn(model, batch):
        with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
            return model(**batch).loss

    def hold(module, inputs, output):  # calibrate's hook holds a detached view of this input: the same storage
        record(inputs[0])

    for layer in model.lora_layers():
        layer.register_forward_hook(hold)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    calibrate(model, [{"input_ids": ids, "labels": ids}], loss_fn=loss_fn)
    measured = sum(size for ptr, size in held.items() if ptr not in own)
    job = Job(ModelGeometry("tiny", hidden, ffn, layers, heads, kv_heads, vocab, 256), micro_batch=batch,
              seq_len=seq, r=r, targets=targets, lora_dropout=0.05, dtype=dtype, device="cpu", fast_adapter_rank=4)
    predicted = calibration_bytes(job)["activations and held inputs"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_calibration_peak_counts_toward_fitting():
    job = Job(GEOMETRIES["llama-3-70b"], strategy="zero3", gpus_per_node=8, nodes=8, micro_batch=2, seq_len=4096,
              r=64, gradient_checkpointing=True, fast_adapter_rank=64)
    calibrating, plain = plan(job), plan(dataclasses.replace(job, fast_adapter_rank=0))
    assert plain.calibration_peak == 0 and plain.gpu == calibrating.gpu
    held = [GradientSketch(i, o, 64, DEFAULT_OVERSAMPLE, 0, "meta").tensors()  # what each layer's sketch holds
            for i, o in job.geometry.linear_shapes().values()]
    assert calibrating.calibration["fast-row sketches"] == 80 * sum(t.nbytes for ts in held for t in ts)
    assert calibrating.calibration_peak > calibrating.gpu_total
    offloaded = plan(dataclasses.replace(job, strategy="fsdp2-offload"))  # the sketches follow the weights to the CPU
    assert "fast-row sketches" not in offloaded.calibration
    assert offloaded.calibration_cpu_per_node["fast-row sketches"] == 8 * calibrating.calibration["fast-row sketches"]
    assert offloaded.calibration_cpu_per_node["sketch update"] == 8 * calibrating.calibration["sketch update"]
    squeezed = dataclasses.replace(job, gpu_memory_gib=(calibrating.gpu_total + calibrating.calibration_peak) / 2 / GiB)
    assert plan(dataclasses.replace(squeezed, fast_adapter_rank=0)).fits and not plan(squeezed).fits
    with pytest.raises(ConfigError, match="fast_adapter_rank must be an integer in \\[0, r=64\\]"):
        dataclasses.replace(job, fast_adapter_rank=65)
    assert main(["--preset", "llama-2-7b", "--method", "lora", "--fast-adapter-rank", "4"]) == 2  # LoRA calibrates nothing


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
    assert main(["--preset", "llama-3-8b", "--strategy", "zero3", "--gpus-per-node", "8", "--seq-len", "4096"]) == 0
    text = capsys.readouterr().out
    assert "activations" in text and "fits in 80 GiB" in text
    assert main(["--preset", "llama-3-70b", "--strategy", "single", "--gpus-per-node", "1", "--json",
                 "--gpu-memory-gib", "24"]) == 1  # 140 GB of bf16 weights on one GPU
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] is False and result["gpu_bytes"]["base weights"] > 130e9
    assert main(["--preset", "no-such-model"]) == 2
    assert "lorafa-scale plan: 'no-such-model' is neither a preset" in capsys.readouterr().err
    assert main(["--seed-table"]) == 0
    assert "| llama-2-70b |" in capsys.readouterr().out


def test_plan_with_a_preset_plans_what_launch_runs(tmp_path, monkeypatch, capsys):
    """`plan --preset X` takes the preset's settings (r, seq, micro batch, checkpointing, engine), as launch does."""
    from lorafa_scale.jobs import launcher

    monkeypatch.chdir(tmp_path)
    assert launcher.main(["--preset", "llama-3-70b", "--nodes", "8", "--global-batch-size", "512", "--dry-run"]) == 0
    launched = capsys.readouterr().out
    assert main(["--preset", "llama-3-70b", "--nodes", "8"]) == 0
    planned = capsys.readouterr().out
    assert planned.strip() in launched
    assert "zero3, 8 node(s) x 8 GPU(s), micro batch 2 x 4096 tokens, LoRA-FA r=64" in planned
    assert "gradient checkpointing on" in planned and "try --no-gradient-checkpointing" not in planned
    # The note on checkpointing appears only where the job also fits without it.
    assert main(["--preset", "llama-2-7b", "--nodes", "1", "--seq-len", "1024", "--micro-batch-size", "1"]) == 0
    assert "fits without gradient checkpointing too" in capsys.readouterr().out


def test_old_spellings_give_the_same_plan_with_a_note(capsys):
    assert main(["--preset", "llama-2-7b", "--quantization", "nf4", "--target-modules", "q_proj", "v_proj",
                 "--micro-batch-size", "1", "--dtype", "bfloat16", "--fsdp", "--json"]) == 0
    new = capsys.readouterr()
    assert main(["llama-2-7b", "--quant", "nf4", "--targets", "q_proj,v_proj", "--micro-batch", "1", "--dtype", "bf16",
                 "--strategy", "fsdp2", "--json"]) == 0
    old = capsys.readouterr()
    assert json.loads(old.out) == json.loads(new.out) and new.err == ""
    assert len(old.err.splitlines()) == 5 and all(" is deprecated, use " in line for line in old.err.splitlines())
