"""Config validation: every error names its field; PEFT's LoraConfig fields are accepted."""

from __future__ import annotations

import pytest

from lorafa_scale import ConfigError, LoraConfig, LoraFAConfig, get_peft_model
from tests.tiny_models import tiny_llama


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r=0), "r"),
        (dict(r=-4), "r"),
        (dict(r=2.5), "r"),
        (dict(r=8, fast_adapter_rank=9), "fast_adapter_rank"),
        (dict(r=8, fast_adapter_rank=-1), "fast_adapter_rank"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(bias="some"), "bias"),
        (dict(init_lora_weights="pissa"), "init_lora_weights"),
        (dict(lora_alpha=0), "lora_alpha"),
    ],
)
@pytest.mark.parametrize("cls", [LoraFAConfig, LoraConfig])
def test_bad_values_name_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}: {field} "):
        cls(**kwargs)


def test_unknown_keyword_suggests_close_name():
    with pytest.raises(ConfigError, match=r"unknown field 'fast_adaptor_rank'; did you mean 'fast_adapter_rank'\?"):
        LoraConfig(fast_adaptor_rank=4)
    with pytest.raises(ConfigError, match=r"unknown field 'task_type_x'"):
        LoraFAConfig(task_type_x=1)
    # LoraFAConfig is the native config: PEFT-only fields are not silently accepted there.
    with pytest.raises(ConfigError, match="unknown field 'fan_in_fan_out'"):
        LoraFAConfig(fan_in_fan_out=True)


def test_peft_fields_accepted_and_unsupported_features_refused():
    config = LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM", fan_in_fan_out=False, inference_mode=False,
                        use_dora=False, rank_pattern={}, target_modules={"q_proj", "v_proj"})
    assert config.target_modules == ["q_proj", "v_proj"] and config.use_fast_adapter
    assert config.scaling == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling == 8.0
    with pytest.raises(ConfigError, match="use_dora=True is a PEFT feature"):
        LoraConfig(use_dora=True)
    with pytest.raises(ConfigError, match="rank_pattern"):
        LoraConfig(rank_pattern={"q_proj": 4})


def test_target_modules_matching_nothing_lists_existing_linear_layers():
    with pytest.raises(ConfigError, match=r"matched no linear layer; linear layers in this model: "
                                          r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["query", "value"]))
    with pytest.raises(ConfigError, match=r"in layers \[7\]"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=7))


def test_non_linear_target_is_refused():
    with pytest.raises(ConfigError, match=r"'model.embed_tokens' is not a linear layer \(it is Embedding\)"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"]))
