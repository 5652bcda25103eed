"""Presets: the written-down geometries build the real transformers models, and the per-size defaults follow
the seed's "Optimal Settings by Model Size" table."""

import pytest
import torch
from transformers import LlamaForCausalLM

from lorafa_scale import ConfigError
from lorafa_scale.jobs.planner import ALL_TARGETS, GiB, Job, plan
from lorafa_scale.jobs.presets import GEOMETRIES, get_preset, nominal_billions, size_defaults


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_builds_the_model_it_describes(name):
    geometry = GEOMETRIES[name]
    with torch.device("meta"):
        model = LlamaForCausalLM(geometry.to_hf_config())
    assert sum(p.numel() for p in model.parameters()) == geometry.num_parameters()
    layer = model.model.layers[0]
    for module_name, (in_features, out_features) in geometry.linear_shapes().items():
        block = "self_attn" if module_name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        module = layer.get_submodule(f"{block}.{module_name}")
        assert (module.in_features, module.out_features) == (in_features, out_features), module_name
    assert len(model.model.layers) == geometry.num_hidden_layers


def test_parameter_counts_match_the_published_sizes():
    # counts published on the models' Hugging Face pages
    assert GEOMETRIES["llama-2-7b"].num_parameters() == 6_738_415_616
    assert GEOMETRIES["llama-3-8b"].num_parameters() == 8_030_261_248
    assert GEOMETRIES["llama-2-70b"].num_parameters() == 68_976_648_192
    assert round(GEOMETRIES["llama-2-13b"].num_parameters() / 1e9, 1) == 13.0
    assert round(GEOMETRIES["llama-3-70b"].num_parameters() / 1e9, 1) == 70.6
    assert round(GEOMETRIES["tinyllama-1.1b"].num_parameters() / 1e9, 1) == 1.1


# (preset, r, alpha, fast_adapter_rank): r and alpha from the seed's table (1B-7B, 7B-13B, >13B), every row of A
# calibrated (the measured best; BENCHMARKS.md section 8)
SEED_TABLE = [
    ("tinyllama-1.1b", 32, 64, 32), ("llama-3.2-1b", 32, 64, 32),
    ("llama-2-7b", 48, 96, 48), ("llama-3-8b", 48, 96, 48), ("llama-2-13b", 48, 96, 48),
    ("llama-2-70b", 64, 128, 64), ("llama-3-70b", 64, 128, 64),
]


@pytest.mark.parametrize("name, r, alpha, fast", SEED_TABLE)
def test_presets_follow_the_seed_table(name, r, alpha, fast):
    preset = get_preset(name)
    assert (preset.r, preset.lora_alpha, preset.fast_adapter_rank) == (r, alpha, fast)
    config = preset.lora_config()
    assert (config.r, config.lora_alpha, config.fast_adapter_rank, config.scaling) == (r, alpha, fast, 2.0)
    assert config.base_model_name_or_path == GEOMETRIES[name].hf_id
    assert preset.seq_len <= GEOMETRIES[name].max_position_embeddings


def test_size_boundaries():
    assert size_defaults(500_000_000).r == 16  # < 1B
    assert nominal_billions(999_000_000) == pytest.approx(0.999)
    assert size_defaults(1_000_000_000).r == 32  # 1B opens 1B-7B
    assert size_defaults(6_400_000_000).r == 32  # a "6B" model
    assert size_defaults(13_400_000_000).r == 48  # "13B" is still 7B-13B
    assert size_defaults(13_600_000_000).r == 64  # "14B" is > 13B
    big, small = get_preset("llama-2-70b"), get_preset("tinyllama-1.1b")
    assert big.micro_batch < small.micro_batch and big.gradient_checkpointing and not small.gradient_checkpointing


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_defaults_fit_80gb_gpus_by_the_planner(name):
    preset = get_preset(name)
    zero = "zero2" if preset.deepspeed_config.endswith("zero2.json") else "zero3"
    assert zero == ("zero2" if preset.geometry.num_parameters() < 6.5e9 else "zero3")  # ZeRO-3 from 7B
    for strategy, nodes in ((zero, 2), ("fsdp2", 2), (zero, 8)):
        job = Job(geometry=preset.geometry, strategy=strategy, nodes=nodes, gpus_per_node=8, r=preset.r,
                  micro_batch=preset.micro_batch, seq_len=preset.seq_len, targets=ALL_TARGETS,
                  gradient_checkpointing=preset.gradient_checkpointing)
        assert plan(job).gpu_total < 60 * GiB, (strategy, nodes)  # 80 GiB GPUs, with room to spare


def test_every_field_is_overridable():
    preset = get_preset("llama-2-13b", r=16, lora_alpha=16, fast_adapter_rank=0, micro_batch=2, seq_len=1024,
                        gradient_checkpointing=False, strategy="fsdp", deepspeed_config="ds_configs/other.json",
                        target_modules=["q_proj", "v_proj"], model="/models/llama-13b", lora_dropout=0.1)
    assert (preset.r, preset.lora_alpha, preset.fast_adapter_rank, preset.micro_batch, preset.seq_len) == (16, 16, 0, 2, 1024)
    assert (preset.gradient_checkpointing, preset.strategy, preset.deepspeed_config) == (False, "fsdp", "ds_configs/other.json")
    assert preset.lora_config().target_modules == ["q_proj", "v_proj"] and preset.model == "/models/llama-13b"
    assert preset.lora_config().lora_dropout == 0.1
    assert get_preset("llama-2-13b", r=None).r == 48  # None keeps the default (unset command-line options)


def test_a_new_rank_brings_the_tables_alpha_and_fast_rank():
    preset = get_preset("llama-3-70b", r=32)
    assert (preset.r, preset.lora_alpha, preset.fast_adapter_rank) == (32, 64, 32)
    preset = get_preset("llama-3-70b", r=32, lora_alpha=32, fast_adapter_rank=0)
    assert (preset.r, preset.lora_alpha, preset.fast_adapter_rank) == (32, 32, 0)


@pytest.mark.parametrize("name, overrides, message", [
    ("llama-2-14b", {}, "unknown model 'llama-2-14b'; did you mean 'llama-2-13b'?"),
    ("llama-2-13b", {"rank": 8}, "unknown field 'rank'"),
    ("llama-2-13b", {"seq_len": 8192}, "seq_len=8192 exceeds the model's max_position_embeddings=4096"),
    ("llama-2-13b", {"micro_batch": 0}, "micro_batch must be a positive integer, got 0"),
    ("llama-2-13b", {"r": 0}, "r must be a positive integer, got 0"),
    ("llama-2-13b", {"strategy": "ddp"}, "strategy must be one of"),
    ("llama-2-13b", {"fast_adapter_rank": 64}, "fast_adapter_rank must be between 0 and r=48"),
])
def test_bad_overrides_name_the_field(name, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        get_preset(name, **overrides)
