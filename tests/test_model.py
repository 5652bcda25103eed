"""Injection into real HF models, merge, save/load, PEFT interoperability, and the seed card's examples."""

from __future__ import annotations

import json
import re
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

from lorafa_scale import AdapterFormatError, LoraConfig, LoraFALinear, LoraFAModel, PeftModel, get_peft_model
from tests.tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama

SEED_CARD = Path(__file__).parent / "data" / "seed.md"  # a copy of shared/seed.md


def ids(vocab=128, shape=(2, 12), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def train_b(model, steps=3):
    """A few SGD steps so that B is non-zero and the adapter changes the logits."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = ids()
    model.train()
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def logits(model, x=None):
    with torch.no_grad():
        return model(input_ids=ids() if x is None else x).logits


def wrapped_names(model):
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraFALinear)})


@pytest.mark.parametrize(
    "factory, expected",
    [
        (tiny_llama, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        (tiny_gpt2, ["c_attn", "c_fc", "c_proj"]),
        (tiny_bert_classifier, ["dense", "key", "query", "value"]),
    ],
)
def test_all_linear_skips_output_head_and_trains_only_b(factory, expected):
    model = get_peft_model(factory(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert wrapped_names(model) == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("lora_B.weight") for n in trainable)
    assert not any("lm_head" in n or "classifier" in n for n in trainable)


def test_gpt2_conv1d_training_lowers_loss_and_merges():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    x = ids()
    before = model(input_ids=x, labels=x).loss.item()
    train_b(model, steps=5)
    after = model(input_ids=x, labels=x).loss.item()
    assert after < before - 0.05
    expected = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraFALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)


def test_bias_and_modules_to_save_are_trainable_as_in_peft():
    model = get_peft_model(tiny_llama(attention_bias=True), LoraConfig(target_modules=["q_proj"], bias="lora_only"))
    trainable = {n.split("layers.0.")[-1] for n, p in model.named_parameters() if p.requires_grad and "layers.0." in n}
    assert trainable == {"self_attn.q_proj.lora_B.weight", "self_attn.q_proj.base_layer.bias"}
    model = get_peft_model(tiny_llama(attention_bias=True), LoraConfig(target_modules=["q_proj"], bias="all"))
    assert any(n.endswith("k_proj.bias") and p.requires_grad for n, p in model.named_parameters())
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    assert model.peft_config["default"].modules_to_save == ["classifier", "score"]
    assert any("classifier.modules_to_save.default.weight" in n and p.requires_grad
               for n, p in model.named_parameters())


def test_disable_adapter_gives_base_logits_even_when_merged():
    base_logits = logits(tiny_llama())
    model = train_b(get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear")))
    adapted = logits(model)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_logits)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model), adapted, rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_in_peft_format(tmp_path):
    model = train_b(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.1)))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert set(weights) == {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
                            for i in range(2) for m in ("q_proj", "v_proj") for ab in "AB"}
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads((tmp_path / "lorafa_config.json").read_text())["use_fast_adapter"] is True

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model))
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = LoraFAModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert {n.rsplit(".", 2)[-2] for n, p in trainable.named_parameters() if p.requires_grad} == {"lora_B"}


def test_our_adapter_loads_in_peft_with_same_logits(tmp_path):
    model = train_b(get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(theirs), logits(model), rtol=1e-5, atol=1e-5)


def test_gpt2_and_classifier_adapters_load_in_peft(tmp_path):
    gpt2 = train_b(get_peft_model(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])))
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "gpt2")), logits(gpt2),
                               rtol=1e-5, atol=1e-5)

    bert = get_peft_model(tiny_bert_classifier(), LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"],
                                                             init_lora_weights=False))
    with torch.no_grad():
        bert.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    bert.save_pretrained(tmp_path / "bert")
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "bert" / "adapter_model.safetensors")
    theirs = peft.PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "bert")
    torch.testing.assert_close(logits(theirs), logits(bert), rtol=1e-5, atol=1e-5)
    ours = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path / "bert")
    torch.testing.assert_close(logits(ours), logits(bert), rtol=1e-5, atol=1e-5)


def test_peft_lora_adapter_loads_here_with_a_frozen_and_correction_from_a(tmp_path):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                                                               init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    layer = ours.base_model.model.model.layers[1].self_attn.o_proj
    assert not layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    a = layer.lora_A.weight.double()
    torch.testing.assert_close(layer.b_grad_correction.double(), torch.linalg.inv(a @ a.T) / layer.scaling**2,
                               rtol=1e-4, atol=1e-6)


def test_bad_adapter_directories_name_the_file(tmp_path):
    with pytest.raises(AdapterFormatError, match=r"adapter_config.json: not found"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "r4")
    config_path = tmp_path / "r4" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "target_modules": ["q_proj", "k_proj"]}))
    with pytest.raises(AdapterFormatError, match=r"adapter_model.safetensors: adapter does not fit this model; missing"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "r4")
    config_path.write_text("{not json")
    with pytest.raises(AdapterFormatError, match=r"adapter_config.json: invalid JSON"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "r4")


def seed_blocks():
    return re.findall(r"```python\n(.*?)```", SEED_CARD.read_text(), flags=re.S)


def test_seed_card_examples_run_with_only_the_import_changed(tmp_path):
    """Every code block of the seed card, run in order in one session as a reader would (later blocks use
    names imported by earlier ones), with `from peft import` -> `from lorafa_scale import` and hub names
    pointing at locally saved tiny models of the same architectures."""
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    tiny_bert_classifier(num_labels=2).save_pretrained(tmp_path / "bert")
    blocks = seed_blocks()
    assert len(blocks) == 6
    models, namespace = [], {}
    for block in blocks:
        code = block.replace("from peft import", "from lorafa_scale import")
        code = code.replace('"gpt2"', repr(str(tmp_path / "gpt2")))
        code = code.replace('"bert-base-uncased"', repr(str(tmp_path / "bert")))
        namespace.pop("model", None)
        exec(compile(code, str(SEED_CARD), "exec"), namespace)
        assert isinstance(namespace["config"], LoraConfig) and namespace["config"].use_fast_adapter
        if "model" in namespace:
            models.append(namespace["model"])
    gpt2, bert = models
    assert isinstance(gpt2, LoraFAModel) and wrapped_names(gpt2) == ["c_attn"]
    assert wrapped_names(bert) == ["key", "query", "value"]
    x = ids()
    gpt2.train()
    gpt2(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in gpt2.named_parameters() if p.requires_grad)


def test_unload_returns_the_untouched_base_model():
    base_logits = logits(tiny_llama())
    model = train_b(get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear")))
    model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, LoraFALinear) for m in plain.modules())
    torch.testing.assert_close(logits(plain), base_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory, path", [(tiny_llama, "model.layers.0.self_attn.q_proj"),
                                           (tiny_gpt2, "transformer.h.0.attn.c_attn")])
def test_wrapped_layers_answer_weight_and_bias_with_the_base_layers_as_peft_does(factory, path):
    base = factory()
    before = {name: p for name, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    layer = model.get_base_model().get_submodule(path)
    assert isinstance(layer, LoraFALinear)
    assert layer.weight is before[f"{path}.weight"]
    assert layer.bias is before.get(f"{path}.bias")  # Llama's q_proj has none, GPT-2's Conv1D has one
    # the parameters stay registered once, under base_layer, for ZeRO-3, FSDP2 and state dicts
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and not any(n.endswith(f"{path.split('.')[-1]}.weight") for n in names)
    assert len({id(p) for p in model.parameters()}) == len(before) + 2 * len(model.lora_layers())
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=4, target_modules="all-linear"))
    assert theirs.get_base_model().get_submodule(path).weight.shape == layer.weight.shape
