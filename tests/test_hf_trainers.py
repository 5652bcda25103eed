"""transformers' Trainer, TRL's SFTTrainer and accelerate take a LoraFAModel as they take a PEFT model.

Each run is real (a tiny Llama saved locally, a byte-level tokenizer, a few steps on CPU, nothing downloaded)
and ends with the same checks: the output holds the adapter in PEFT's format (never the whole model), PEFT
and lorafa-scale load it with the trained model's logits, and only lora_B trained (A bit for bit unchanged).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import huggingface_hub.constants
import peft
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from lorafa_scale import LoraConfig, LoraFALinear, LoraFAModel, calibrate, get_peft_model
from lorafa_scale.training.embedded import build_tokenizer
from tests.tiny_models import save_tiny_llama

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "lorafa_config.json"}
WHOLE_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "adapter_model.bin"}
TEXTS = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
         "how vexingly quick daft zebras jump", "sphinx of black quartz, judge my vow"] * 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)  # TRL sends telemetry
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama and the byte-level tokenizer (with a chat template), saved locally."""
    path = tmp_path_factory.mktemp("base")
    tokenizer = build_tokenizer()
    save_tiny_llama(path, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tokenizer.save_pretrained(path)
    return path


def adapted(base_dir, **overrides) -> LoraFAModel:
    torch.manual_seed(0)
    config = dict(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05)
    config.update(overrides)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**config))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_only_b_trained(model, before) -> None:
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora_b = {n for n in before if ".lora_B." in n}
    assert changed == lora_b  # every B moved; A, the base and everything else bit for bit unchanged


def assert_adapter_dir(directory, model, base_dir) -> None:
    """PEFT's files only; the saved A and B are the model's; PEFT and lorafa-scale load it with its logits."""
    names = {p.name for p in Path(directory).iterdir()}
    assert ADAPTER_FILES <= names and not names & WHOLE_MODEL_FILES, names
    saved = load_file(str(Path(directory) / "adapter_model.safetensors"))
    live = model.adapter_state_dict()
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k].detach().cpu()) for k in saved)
    x = torch.randint(3, 262, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        # through the inner HF model: a Trainer leaves accelerate's autocast wrapper on the outer forward
        ours = model.get_base_model()(input_ids=x).logits
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), directory)(input_ids=x)
        reloaded = LoraFAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), directory)(input_ids=x)
    torch.testing.assert_close(theirs.logits, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(reloaded.logits, ours, rtol=0, atol=1e-5)


def lm_dataset(base_dir) -> Dataset:
    """Fixed-length examples plus a text column the model's forward does not take (Trainer must drop it)."""
    tokenizer = build_tokenizer()
    ids = [tokenizer(t[:24].ljust(24), add_special_tokens=False)["input_ids"] for t in TEXTS]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 24] * len(ids), "labels": ids, "text": TEXTS})


def trainer_args(out, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                  save_steps=2, logging_steps=1, report_to="none", use_cpu=True, seed=0, data_seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def test_trainer_with_default_arguments_trains_saves_the_adapter_and_resumes_with_the_same_a(base_dir, tmp_path):
    model = adapted(base_dir)
    before = snapshot(model)
    trainer = Trainer(model=model, args=trainer_args(tmp_path / "run"), train_dataset=lm_dataset(base_dir))
    trainer.train()
    assert_only_b_trained(model, before)
    trainer.save_model(tmp_path / "final")
    assert_adapter_dir(tmp_path / "final", model, base_dir)
    for step in (2, 4):  # Trainer's own checkpoints hold the adapter, not the model
        names = {p.name for p in (tmp_path / "run" / f"checkpoint-{step}").iterdir()}
        assert ADAPTER_FILES <= names and not names & WHOLE_MODEL_FILES, names

    # Resume from step 2 on a model whose A differs: the checkpoint's A comes back, and the run ends where
    # the uninterrupted one did.
    resumed = adapted(base_dir)
    with torch.no_grad():
        for layer in resumed.lora_layers():
            layer.lora_A.weight.mul_(-1.0)
            layer.refresh_b_grad_correction()
    resumer = Trainer(model=resumed, args=trainer_args(tmp_path / "run"), train_dataset=lm_dataset(base_dir))
    resumer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumer.state.global_step == 4
    for name, p in resumed.named_parameters():
        if ".lora_A." in name:
            assert torch.equal(p, before[name]) and not p.requires_grad
        elif ".lora_B." in name:
            torch.testing.assert_close(p, dict(model.named_parameters())[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(p, before[name])


def test_trainer_trains_a_calibrated_model_without_the_warning_and_keeps_its_a(base_dir, tmp_path):
    """calibrate before trainer.train(), as README says: the fast rows survive training and the saved adapter."""
    model = adapted(base_dir, fast_adapter_rank=8, lora_dropout=0.0)
    dataset = lm_dataset(base_dir)
    batches = [{key: torch.tensor(dataset[key][i:i + 4]) for key in ("input_ids", "attention_mask", "labels")}
               for i in (0, 4)]
    random_a = snapshot(model)
    calibrate(model, batches)
    calibrated = snapshot(model)
    assert all(not torch.equal(calibrated[n], random_a[n]) for n in random_a if ".lora_A." in n)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fast_adapter_rank=8 but A was never calibrated")
        Trainer(model=model, args=trainer_args(tmp_path / "run"), train_dataset=dataset).train()
    assert_only_b_trained(model, calibrated)
    saved = load_file(str(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors"))
    live = model.adapter_state_dict()
    assert all(torch.equal(saved[n], live[n]) for n in saved if ".lora_A." in n)


@pytest.mark.parametrize("data, gradient_checkpointing", [("text", True), ("chat", False)])
def test_trl_sft_trainer_trains_with_its_fused_loss_and_saves_the_adapter(base_dir, tmp_path, data,
                                                                          gradient_checkpointing):
    from trl import SFTConfig, SFTTrainer

    if data == "text":
        dataset = Dataset.from_dict({"text": TEXTS})
    else:
        dataset = Dataset.from_dict({"messages": [
            [{"role": "user", "content": t[:12]}, {"role": "assistant", "content": t[12:]}] for t in TEXTS
        ]})
    model = adapted(base_dir)
    before = snapshot(model)
    head_calls = []  # the fused LM-head loss reads lm_head.weight and never builds the full logits
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, save_steps=3, report_to="none", use_cpu=True, seed=0, max_length=48,
                     gradient_checkpointing=gradient_checkpointing)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=build_tokenizer())
    trainer.train()
    assert head_calls == []
    assert model.get_base_model().is_gradient_checkpointing == gradient_checkpointing
    assert_only_b_trained(model, before)
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_dir(tmp_path / "final", model, base_dir)
    assert ADAPTER_FILES <= {p.name for p in (tmp_path / "run" / "checkpoint-3").iterdir()}


def test_accelerate_prepare_trains_and_generate_matches_peft(base_dir, tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = adapted(base_dir)
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = lm_dataset(base_dir)[:4]
    x = torch.tensor(batch["input_ids"])
    model.train()
    for _ in range(2):
        accelerator.backward(model(input_ids=x, labels=x).loss)
        optimizer.step()
        optimizer.zero_grad()
    model = accelerator.unwrap_model(model)
    assert_only_b_trained(model, before)
    model.save_pretrained(tmp_path / "adapter")
    assert_adapter_dir(tmp_path / "adapter", model, base_dir)
    prompt = x[:2, :6]
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=prompt, **kwargs), theirs.generate(input_ids=prompt, **kwargs))


def test_the_model_is_a_peft_model_with_one_adapter_and_refuses_what_it_does_not_implement(base_dir, tmp_path):
    from transformers.trainer_utils import _is_peft_model

    model = adapted(base_dir)
    assert isinstance(model, peft.PeftModel) and isinstance(model, LoraFAModel) and _is_peft_model(model)
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    assert model.peft_config["default"].r == 8 and model.get_base_model() is model.base_model.model
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj, LoraFALinear)
    with pytest.raises(NotImplementedError, match="one adapter"):
        model.load_adapter(tmp_path, "other")
    with pytest.raises(NotImplementedError, match="get_model_status"):
        model.get_model_status()
    model.set_requires_grad("default", False)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_requires_grad("default", True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_B." in n
    }
    # save_pretrained(state_dict=...) takes a whole model state dict (in-memory names, as Trainer passes under
    # FSDP) and keeps the adapter's tensors; one without the frozen A is refused
    model = adapted(base_dir, modules_to_save=["lm_head"])
    model.save_pretrained(tmp_path / "live")
    model.save_pretrained(tmp_path / "from_state", state_dict=model.state_dict())
    live, from_state = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("live", "from_state"))
    assert live.keys() == from_state.keys() and all(torch.equal(live[k], from_state[k]) for k in live)
    assert any("lm_head.weight" in k for k in live)
    without_a = {k: v for k, v in model.state_dict().items() if ".lora_A." not in k}
    with pytest.raises(ValueError, match="frozen A"):
        model.save_pretrained(tmp_path / "no_a", state_dict=without_a)
    # PEFT (which imports bitsandbytes) is imported on the first model built, not by `import lorafa_scale`
    code = "import sys, lorafa_scale; assert 'peft' not in sys.modules and 'bitsandbytes' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
