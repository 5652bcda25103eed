"""Checkpoints: atomic under SIGKILL at random instants, pruning, RNG restore, resumability checks."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorafa_scale import LoraFAConfig, get_peft_model
from lorafa_scale.engines.strategy import Strategy
from lorafa_scale.training.checkpoint import (
    CheckpointError,
    check_resumable,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tests.tiny_models import tiny_llama

REPO = Path(__file__).resolve().parents[2]

# Resumes from the latest checkpoint, then saves checkpoints forever; before saving step N it sets every B to N and takes one optimizer step with a
# gradient of N, so a checkpoint mixing two steps' files is detectable.
SAVER = """
import sys, torch
from tests.training.test_checkpoint import make_strategy, fill
from lorafa_scale.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
out = sys.argv[1]
strategy = make_strategy()
latest = latest_checkpoint(out)
step = load_checkpoint(strategy, latest)["step"] if latest else 0
while True:
    step += 1
    fill(strategy, step)
    save_checkpoint(strategy, out, step, {"step": step}, keep_last=2)
    print(step, flush=True)
"""


def make_strategy() -> Strategy:
    model = get_peft_model(tiny_llama(), LoraFAConfig(r=4, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    strategy = Strategy()
    strategy.setup(model, optimizer, scheduler)
    return strategy


def fill(strategy: Strategy, step: int) -> None:
    for layer in strategy.model.lora_layers():
        layer.lora_B.weight.grad = torch.full_like(layer.lora_B.weight, float(step))
    strategy.step()
    with torch.no_grad():
        for layer in strategy.model.lora_layers():
            layer.lora_B.weight.fill_(step)


def assert_consistent(directory: Path, step: int) -> None:
    """Every part of the checkpoint belongs to `step`: B, the client state and the optimizer's step count."""
    strategy = make_strategy()
    state = load_checkpoint(strategy, directory)
    assert state == {"step": step}
    for layer in strategy.model.lora_layers():
        assert torch.all(layer.lora_B.weight == step)
    assert all(int(s["step"]) == step for s in strategy.optimizer.state_dict()["state"].values())
    assert strategy.scheduler.last_epoch == step


def test_sigkill_at_any_instant_leaves_only_complete_checkpoints(tmp_path):
    rng = random.Random(0)
    for attempt in range(3):
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                 text=True)
        try:
            for _ in range(3 + attempt):  # let a few saves complete, then kill at a random instant
                assert child.stdout.readline(), "the saver died"
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        found = complete_checkpoints(tmp_path)
        assert 1 <= len(found) <= 3  # keep_last=2, plus one not yet pruned when killed between rename and prune
        steps = [s for s, _ in found]
        assert steps == list(range(steps[0], steps[-1] + 1))
        for step, directory in found:
            assert_consistent(directory, step)
        assert latest_checkpoint(tmp_path) == found[-1][1]


def test_keep_last_prunes_after_the_new_checkpoint_and_rng_is_restored(tmp_path):
    strategy = make_strategy()
    for step in range(1, 6):
        fill(strategy, step)
        save_checkpoint(strategy, tmp_path, step, {"step": step}, keep_last=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [4, 5]
    expected = torch.rand(3)  # drawn right after the step-5 checkpoint captured the RNG state
    torch.manual_seed(1234)
    assert_consistent(tmp_path / "checkpoints" / "step-5", 5)
    strategy = make_strategy()
    load_checkpoint(strategy, tmp_path / "checkpoints" / "step-5")
    assert torch.equal(torch.rand(3), expected)


def test_a_checkpoint_from_another_world_size_is_refused(tmp_path):
    strategy = make_strategy()
    directory = save_checkpoint(strategy, tmp_path, 1, {"step": 1}, keep_last=1)
    check_resumable(directory, world_size=1)
    with pytest.raises(CheckpointError, match="not a checkpoint for 2 process"):
        check_resumable(directory, world_size=2)
    with pytest.raises(CheckpointError, match="not a checkpoint for 1 process"):
        check_resumable(tmp_path, world_size=1)
