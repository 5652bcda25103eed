"""FSDP2: 2 real processes on CPU (gloo) against a single-process run of the same training.

One torchrun launch of tests/workers/fsdp_train.py serves the library checks (training, export, activation
checkpointing on/off, a bf16 + CPU-offload step, a 4-bit base); two of launch/train.py --fsdp check the
training script end to end (an uninterrupted run started by accelerate with launch/accelerate_fsdp.yaml, then
one resumed from its middle checkpoint).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorafa_scale import ConfigError, get_peft_model
from lorafa_scale.engines.fsdp import decoder_layers, init_adapters, load_model, shard_model
from lorafa_scale.engines.strategy import Strategy
from lorafa_scale.quantization import load_model as load_quantized
from lorafa_scale.training.metrics import read_metrics
from tests.tiny_models import save_tiny_llama, tiny_llama
from tests.workers.fsdp_train import LR, SEED, STEPS, VOCAB, global_batches, lora_config

ROOT = Path(__file__).parents[2]
WORKER = ROOT / "tests" / "workers" / "fsdp_train.py"
TRAIN = ROOT / "launch" / "train.py"
ACCELERATE_CONFIG = ROOT / "launch" / "accelerate_fsdp.yaml"


def run(command: list) -> None:
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def torchrun(*argv) -> None:
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv])


def accelerate_launch(*argv) -> None:
    with socket.socket() as s:  # a free port: other jobs on this machine may hold accelerate's default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", ACCELERATE_CONFIG,
         "--num_processes", "2", "--main_process_port", port, *argv])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(output dir, model dir, what the worker's rank 0 reported)."""
    out = tmp_path_factory.mktemp("fsdp")
    # A tied head must stay tied; an odd vocabulary size shards unevenly.
    model_dir = Path(save_tiny_llama(out / "model", tie_word_embeddings=True, vocab_size=VOCAB))
    torchrun(WORKER, model_dir, out)
    return out, model_dir, json.loads((out / "train.json").read_text())


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """launch/train.py --fsdp: 4 steps with checkpoints started by `accelerate launch` with our config,
    then resumed from step 2 under torchrun (adapter dropout on)."""
    out = tmp_path_factory.mktemp("fsdp_trainer")
    run_dir = out / "run"
    options = ["--fsdp", "--max-steps", "4", "--save-every", "2", "--keep-last", "3", "--lora-dropout", "0.1",
               "--output-dir", run_dir]
    accelerate_launch(TRAIN, *options)
    shutil.copytree(run_dir / "adapter", out / "uninterrupted")
    uninterrupted = read_metrics(run_dir / "metrics.jsonl")
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    torchrun(TRAIN, *options, "--resume", run_dir / "checkpoints" / "step-2")
    return out, uninterrupted, read_metrics(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def reference(runs):
    """The same training in one process: the whole global batch per step, no sharding."""
    _, model_dir, _ = runs
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora_config())
    init_adapters(model, SEED)
    strategy = Strategy(grad_accum=1, max_grad_norm=1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    strategy.setup(model, strategy.make_optimizer(params, lr=LR, weight_decay=0.0), None)
    losses = []
    for step in range(STEPS):
        ids = global_batches()[step]
        loss = model(input_ids=ids, labels=ids).loss
        strategy.backward(loss)
        strategy.step()
        losses.append(float(loss.detach()))
    return model, losses


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_two_ranks_train_like_one_process(runs, reference):
    out, _, train = runs
    model, losses = reference
    assert train["world_size"] == 2
    assert train["losses"] == pytest.approx(losses, rel=1e-5)
    exported = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    expected = model.adapter_state_dict()
    assert sorted(exported) == sorted(expected)
    for key, tensor in exported.items():
        if ".lora_A." in key:
            assert torch.equal(tensor, expected[key]), key  # same seed: the same A on every rank
        else:
            assert expected[key].abs().max() > 0
            assert relative_error(tensor, expected[key]) < 1e-5, key


def test_base_and_adapters_are_sharded(runs):
    train = runs[2]
    assert train["q_proj_local_shape"] == [32, 64]  # q_proj is 64 x 64: half the rows per rank
    assert train["q_proj_lora_A_local_shape"] == [2, 64]  # A is 4 x 64


def test_exported_adapter_loads_in_peft(runs, reference):
    from peft import PeftModel

    out, model_dir, _ = runs
    model, _ = reference
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    ids = global_batches()[0]
    with torch.no_grad():
        ours, theirs = model.eval()(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits
        without_adapter = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
    assert (theirs - without_adapter).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_train_script_resumes_exactly(trainer_runs):
    out, uninterrupted, resumed = trainer_runs
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in uninterrupted]
    expected = load_file(str(out / "uninterrupted" / "adapter_model.safetensors"))
    got = load_file(str(out / "run" / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def test_train_script_adapter_loads_in_peft(trainer_runs):
    from peft import PeftModel

    out = trainer_runs[0]
    base = AutoModelForCausalLM.from_pretrained(out / "run" / "base_model")
    peft_model = PeftModel.from_pretrained(base, out / "run" / "adapter")
    assert any(float(p.abs().max()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_activation_checkpointing_gives_same_gradients(runs):
    train = runs[2]
    assert (train["forward_calls_off"], train["forward_calls_on"]) == (1, 2)  # on: the layer ran again
    assert train["grad_abs_max"] > 0
    assert train["checkpointing_max_abs_diff"] <= 1e-7 * train["grad_abs_max"]


def test_wrap_shards_a_built_model(runs):
    """lorafa_scale.engines.wrap_sharded_model on a model built whole: sharded, optimizer and scheduler
    built from callables, the first loss equal to the strategy run's."""
    train = runs[2]
    wrapped = train["wrapped"]
    assert wrapped["q_proj_local_shape"] == [32, 64]
    assert wrapped["loss"] == pytest.approx(train["losses"][0], rel=1e-6)
    assert wrapped["lr"] == pytest.approx(LR / 2) and wrapped["b_norm"] > 0


def test_bf16_mixed_precision_with_cpu_offload_trains(runs):
    bf16 = runs[2]["bf16"]
    assert (bf16["base_dtype"], bf16["b_dtype"]) == ("torch.bfloat16", "torch.float32")
    assert 0 < bf16["b_norm"] and torch.isfinite(torch.tensor(bf16["loss"]))


def test_checkpoint_missing_a_weight_is_named(runs):
    assert "no weight for base_model.model.model.norm.weight" in runs[2]["missing_weight_error"]


def test_4bit_base_shards_and_gives_unsharded_gradients(runs):
    nf4 = runs[2]["nf4"]
    assert (nf4["packed_shape"], nf4["packed_local_shape"]) == ([512, 1], [256, 1])  # 64x64 nf4 in fp32 words
    assert nf4["max_relative_error"] < 1e-5


# -- errors raised before any distributed work ------------------------------------------------------------
def test_bad_model_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nowhere", lora_config())
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path, lora_config())


def test_train_script_errors_name_the_fix(tmp_path, capsys):
    from lorafa_scale.training.loop import main

    assert main(["--fsdp", "--model", "some-org/some-model", "--output-dir", str(tmp_path / "run")]) == 2
    assert "--model some-org/some-model: --fsdp reads the base weights from a local directory" in capsys.readouterr().err
    assert main(["--fsdp", "--model", save_tiny_llama(tmp_path / "model"), "--output-dir", str(tmp_path / "run")]) == 2
    assert "start the processes with torchrun" in capsys.readouterr().err


def test_bad_options_are_named(tmp_path):
    model_dir = save_tiny_llama(tmp_path)
    model = get_peft_model(tiny_llama(), lora_config())
    with pytest.raises(ConfigError, match="mixed_precision"):
        shard_model(model, mixed_precision="bf8")
    assert len(decoder_layers(model)) == 2
    packed_in_fp32 = load_quantized(model_dir, "nf4", torch.float32, lora_config())
    with pytest.raises(ConfigError, match="bnb_4bit_quant_storage=torch.bfloat16"):
        shard_model(packed_in_fp32, mixed_precision="bf16")
    with pytest.raises(ConfigError, match="8-bit"):
        shard_model(load_quantized(model_dir, "int8", torch.float32, lora_config()), mixed_precision="fp32")
    with pytest.raises(ConfigError, match="int8"):
        load_model(model_dir, lora_config(), quantization="int8")
    with pytest.raises(ConfigError, match="no decoder layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
