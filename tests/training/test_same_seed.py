"""Same seed, same adapter, whatever the engine: launch/train.py on one process, and on 2 ranks under
ZeRO-3, ZeRO-2 and FSDP2, with the same --seed, global batch and no dropout, ends with the same adapter.

Each layer draws its frozen A from (seed, module name) (layer.adapter_seed), so a random A is identical on
every path; B then follows the same gradients (the engines' own parity tests bound the float differences).
Calibrated fast rows (fast_adapter.calibrate) come from sketches summed over the ranks: on 2 ranks they
equal one process's on the same global batches up to the order of float additions.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.training.test_train import REPO, adapter, run_train
from tests.training.test_train_deepspeed import free_port, run

pytest.importorskip("deepspeed")

# Global batch 8 in every run; dropout 0 (each rank draws its own masks).
SAME = ["--max-steps", "4", "--micro-batch-size", "4", "--global-batch-size", "8", "--seq-len", "64",
        "--lora-dropout", "0", "--save-every", "0", "--lr", "1e-2", "--seed", "7"]
RANDOM_A, CALIBRATED_A = ["--fast-adapter-rank", "0"], ["--fast-adapter-rank", "4", "--calibration-batches", "2"]


def single_process(tmp_path_factory, *options) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("single") / "run"
    done = run_train("--output-dir", out, *SAME, *options)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return adapter(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return single_process(tmp_path_factory, *RANDOM_A)


@pytest.fixture(scope="module")
def single_calibrated(tmp_path_factory):
    return single_process(tmp_path_factory, *CALIBRATED_A)


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours.double() - expected.double()).norm() / expected.double().norm())


def two_ranks(out, *engine) -> dict[str, torch.Tensor]:
    if engine[0] == "--fsdp":
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--"]
    else:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()),
                    "--num_gpus", "2"]
    run([*launcher, str(REPO / "launch" / "train.py"), *engine, "--output-dir", str(out), *SAME])
    return adapter(out)


ENGINES = [("--config", "ds_configs/zero3.json"), ("--config", "ds_configs/zero2.json"), ("--fsdp",)]


@pytest.mark.parametrize("engine", ENGINES, ids=["zero3", "zero2", "fsdp2"])
def test_two_ranks_end_with_the_single_process_adapter(single, tmp_path, engine):
    ours = two_ranks(tmp_path / "run", *engine, *RANDOM_A)
    assert ours.keys() == single.keys()
    for key, expected in single.items():
        if ".lora_A." in key:
            assert torch.equal(ours[key], expected), key
        else:
            assert expected.abs().max() > 0, key
            assert relative_error(ours[key], expected) < 1e-4, key


@pytest.mark.parametrize("engine", [ENGINES[0], ENGINES[2]], ids=["zero3", "fsdp2"])
def test_calibration_on_two_ranks_equals_one_process_on_the_same_global_batches(single_calibrated, single,
                                                                                 tmp_path, engine):
    ours = two_ranks(tmp_path / "run", *engine, *CALIBRATED_A)
    assert ours.keys() == single_calibrated.keys()
    for key, expected in single_calibrated.items():
        if ".lora_A." in key:
            assert not torch.allclose(expected[:4], single[key][:4])  # the fast rows were calibrated
            assert relative_error(ours[key], expected) < 1e-4, key
        else:
            assert relative_error(ours[key], expected) < 1e-3, key


def test_a_depends_on_the_seed_and_the_layer_name_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafa_scale import LoraFAConfig, get_peft_model

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    config_lora = LoraFAConfig(r=4, target_modules=["q_proj", "v_proj"])

    def a_matrices(seed, draws_before):
        torch.manual_seed(seed)
        torch.randn(draws_before)  # other random work before injection must not change A
        model = get_peft_model(LlamaForCausalLM(config), config_lora)
        return {k: v.clone() for k, v in model.adapter_state_dict().items() if ".lora_A." in k}

    first, second, other = a_matrices(3, 0), a_matrices(3, 1000), a_matrices(4, 0)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in first)
    assert not torch.equal(first[next(iter(first))], first[list(first)[1]])  # layers differ from each other
