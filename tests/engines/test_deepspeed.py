"""DeepSpeed ZeRO-3 / ZeRO-2: 2 real processes on CPU (gloo) against a single-process run of the same training.

One torchrun launch of tests/workers/deepspeed_train.py per stage checks training, export, stop-and-resume, the
gathered weights alive between forward and backward, and activation checkpointing; the single-process
reference runs here with the base Strategy on the same global batches and the same initial adapter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorafa_scale import LoraFAModel
from lorafa_scale.engines.deepspeed_config import DeepSpeedConfigError, resolve_ds_config
from lorafa_scale.engines.strategy import Strategy
from lorafa_scale.peft_format import WEIGHTS_NAME
from lorafa_scale.quantization import load_model as load_quantized
from tests.tiny_models import save_tiny_llama, tiny_llama_config
from tests.workers import deepspeed_train as worker

ROOT = Path(__file__).parents[2]
WORKER = ROOT / "tests" / "workers" / "deepspeed_train.py"
STEPS, SEQ = 4, 16


def torchrun(*argv, timeout: int = 300) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(worker.WORLD), *map(str, argv)]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun's workers too: none is left running after the test
        process.communicate()
        pytest.fail(f"{Path(argv[0]).name} on {worker.WORLD} ranks did not finish in {timeout} s")
    if process.returncode != 0:  # the error lines of both ranks, not only torchrun's summary
        output = (stdout + stderr).splitlines()
        errors = [line for line in output if re.search(r"Error|error:|what\(\)|terminate|Traceback", line)]
        pytest.fail("\n".join(errors[-40:] + output[-20:]))


def adapter(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / WEIGHTS_NAME))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def reference_run(base, initial_adapter, batches):
    """Single process, whole global batch per micro-step: (losses, grad norms, adapter state dict)."""
    model = LoraFAModel.from_pretrained(base, initial_adapter, is_trainable=True)
    strategy = Strategy(worker.ACCUM, worker.CLIP)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = worker.make_optimizer(trainable)
    strategy.setup(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, worker.warmup))
    losses, norms = [], []
    for micro_batches in batches:
        step_loss = 0.0
        for ids in micro_batches:
            loss = model(input_ids=ids, labels=ids).loss
            strategy.backward(loss)
            step_loss += float(loss.detach()) / len(micro_batches)
        norms.append(strategy.step())
        losses.append(step_loss)
    return losses, norms, strategy.adapter_state_dict()


def launch(tmp_path_factory, stage: int):
    out = tmp_path_factory.mktemp(f"zero{stage}")
    model_dir = save_tiny_llama(out / "model")
    generator = torch.Generator().manual_seed(stage)
    shape = (STEPS, worker.ACCUM, worker.WORLD * worker.MICRO, SEQ)  # step, micro-step, global batch, tokens
    batches = torch.randint(0, tiny_llama_config().vocab_size, shape, generator=generator)
    torch.save(batches, out / "batches.pt")
    torchrun(WORKER, "--model", model_dir, "--batches", out / "batches.pt", "--out", out, "--stage", stage)
    result = json.loads((out / "result.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return out, result, reference_run(base, out / "initial_adapter", batches)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """(output dir, what rank 0 reported, the single-process reference)."""
    return launch(tmp_path_factory, 3)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return launch(tmp_path_factory, 2)


@pytest.mark.parametrize("stage", [3, 2])
def test_sharded_training_matches_single_process(stage, request):
    out, result, (losses, norms, reference) = request.getfixturevalue(f"zero{stage}")
    exported = adapter(out / "final_adapter")
    assert sorted(exported) == sorted(reference)
    for key, tensor in exported.items():
        assert tensor.shape == reference[key].shape, key  # never a shape-[0] ZeRO-3 partition
        assert rel_diff(tensor, reference[key]) < 1e-5, key
    assert any(".lora_B." in k and reference[k].abs().max() > 0 for k in reference)  # B did train
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(result["grad_norms"]), torch.tensor(norms), rtol=1e-5, atol=0)
    assert max(norms) > worker.CLIP  # clipping was exercised


def test_zero3_on_a_4bit_base_matches_single_process(zero3):
    out, result, _ = zero3
    base = load_quantized(out / "model", "nf4", torch.float32)
    losses, norms, reference = reference_run(base, out / "nf4_initial_adapter",
                                             torch.load(out / "batches.pt", weights_only=True))
    exported = adapter(out / "nf4_final_adapter")
    for key, tensor in exported.items():
        assert rel_diff(tensor, reference[key]) < 1e-5, key
    torch.testing.assert_close(torch.tensor(result["nf4_losses"]), torch.tensor(losses), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(result["nf4_grad_norms"]), torch.tensor(norms), rtol=1e-5, atol=0)
    assert 0.49 < result["nf4_held_fraction"] < 0.51  # the packed 4-bit weights are partitioned too


@pytest.mark.parametrize("stage", [3, 2])
def test_optimizer_holds_only_adapter_B(stage, request):
    out, result, _ = request.getfixturevalue(f"zero{stage}")
    b_values = sum(t.numel() for k, t in adapter(out / "final_adapter").items() if ".lora_B." in k)
    assert result["optimizer_params"] == result["trainable_params"] == b_values


@pytest.mark.parametrize("stage", [3, 2])
def test_resume_from_checkpoint_matches_uninterrupted(stage, request):
    out, result, _ = request.getfixturevalue(f"zero{stage}")
    final, resumed, fresh = (adapter(out / name) for name in ("final_adapter", "resumed_adapter", "fresh_adapter"))
    uninterrupted = result["losses"][worker.RESUME_AT:]
    torch.testing.assert_close(torch.tensor(result["resumed_losses"]), torch.tensor(uninterrupted), rtol=1e-6, atol=0)
    for key in final:
        torch.testing.assert_close(resumed[key], final[key], rtol=1e-6, atol=1e-9)
    # The resumed engine was built with a different random A: the checkpoint's frozen A replaced it.
    assert all(not torch.equal(fresh[k], final[k]) for k in final if ".lora_A." in k)
    checkpoint_files = [p.name for p in (out / "checkpoint").rglob("*") if p.is_file()]
    assert "frozen_adapter.safetensors" in checkpoint_files
    assert result["second_save"] == "refused"  # and the resume above read the first one


@pytest.mark.parametrize("stage", [3, 2])
def test_skipped_step_leaves_no_trace(stage, request):
    _, result, _ = request.getfixturevalue(f"zero{stage}")
    assert not result["skip_changed_adapter"]
    assert result["after_skip_max_diff"] < 1e-7  # the next step equals one taken without the dropped window


def test_exported_adapter_loads_in_peft(zero3):
    from peft import PeftModel

    out, _, (_, _, reference) = zero3
    ids = torch.randint(0, tiny_llama_config().vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(9))
    ours = LoraFAModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "model"), out / "final_adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "model"), out / "final_adapter")
    peft_model.eval()
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(out / "model")(input_ids=ids).logits
        expected, got = ours(input_ids=ids).logits, peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-4  # the adapter changes the output


@pytest.mark.parametrize("base", ["", "nf4_"])
def test_no_gathered_weight_alive_between_forward_and_backward(base, zero3):
    _, result, _ = zero3
    assert result[f"{base}alive_after_forward"] == 0, result[f"{base}alive_names"]  # which weights, if it fails
    assert result[f"{base}gathered_in_forward"] > 10 * result[f"{base}control_weight_numel"]  # all layers seen
    # Control: the same layer with torch's / bitsandbytes' own forward keeps its whole gathered weight alive, so
    # the count does see a kept weight. "At least": one clean-clone run counted twice the weight's elements
    # (cause not found; the main assertion above held; see gathered_alive_after_forward on a storage that
    # outlives its last reference for a moment), which does not weaken what the control shows.
    assert result[f"{base}alive_after_forward_control"] >= result[f"{base}control_weight_numel"] > 0, \
        result[f"{base}alive_names_control"]


def test_activation_checkpointing_under_zero3(zero3):
    _, result, _ = zero3
    for kind in ("reentrant", "non_reentrant"):
        assert result[f"checkpointing_{kind}_rel_diff"] < 1e-6
        assert result[f"saved_tensors_with_{kind}_checkpointing"] < result["saved_tensors_without_checkpointing"] / 4


# -- config resolution (no processes) ---------------------------------------------------------------------
def test_auto_values_resolved_from_the_run():
    config = resolve_ds_config(worker.ds_config(3), world_size=4, micro_batch_size=2, grad_accum=8,
                               max_grad_norm=1.0, hidden_size=64, dtype=torch.bfloat16)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"], config["gradient_clipping"]) == (64, 2, 8, 1.0)
    assert config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert config["zero_optimization"]["memory_efficient_linear"] is False  # DeepSpeed's default would be true


def test_shipped_zero3_config_resolves():
    config = resolve_ds_config(ROOT / "ds_configs" / "zero3.json", world_size=8, micro_batch_size=1, grad_accum=4,
                               max_grad_norm=1.0, hidden_size=8192, dtype=torch.bfloat16)
    zero = config["zero_optimization"]
    assert config["bf16"]["enabled"] is True and config["train_batch_size"] == 32
    assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (
        int(0.9 * 8192**2), 81920)


@pytest.mark.parametrize(("change", "message"), [
    ({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
     "train_batch_size=10 must equal"),
    ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu=3 disagrees"),
    ({"train_batch_size": "8"}, "train_batch_size must be a whole number"),
    ({"zero_optimization": {"stage": 3, "memory_efficient_linear": True}}, "memory_efficient_linear=true"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, "optimizer.params.lr is 'auto'"),
])
def test_bad_config_is_a_one_line_error_naming_the_field(change, message):
    config = {**worker.ds_config(3), **change}
    with pytest.raises(DeepSpeedConfigError, match=message.replace("(", r"\(")):
        resolve_ds_config(config, world_size=2, micro_batch_size=2, grad_accum=2, max_grad_norm=1.0, hidden_size=64)


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "zero_optimization": {"stage": 3,}\n}\n')
    with pytest.raises(DeepSpeedConfigError, match=rf"{path}: invalid JSON at line 3"):
        resolve_ds_config(path)
    with pytest.raises(DeepSpeedConfigError, match="not found"):
        resolve_ds_config(tmp_path / "missing.json")
