"""The built-in job under the deepspeed launcher, 2 CPU processes on ZeRO-3, against one process."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from tests.test_train import ONE_THREAD, REPO, adapter, losses, run_train

pytest.importorskip("deepspeed")

# The same global batch of 8 and no dropout (ranks draw different masks), so both runs compute the same thing.
SAME_STEPS = ["--max-steps", "6", "--micro-batch-size", "4", "--global-batch-size", "8", "--seq-len", "96",
              "--lora-dropout", "0", "--save-every", "3", "--lr", "1e-2"]


def free_port() -> int:
    with socket.socket() as s:  # other jobs on the machine may hold DeepSpeed's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher_zero3_two_processes_matches_one_process(tmp_path):
    env = dict(ONE_THREAD, DS_ACCELERATOR="cpu")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(free_port()), "launch/train.py", "--config", "ds_configs/zero3.json",
               "--output-dir", str(tmp_path / "zero3"), *SAME_STEPS]
    sharded = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420, env=env)
    assert sharded.returncode == 0, sharded.stdout[-3000:] + sharded.stderr[-3000:]
    assert "deepspeed, 2 process(es) | micro 4 x accum 1 x 2 = global 8" in sharded.stdout
    single = run_train("--output-dir", tmp_path / "single", *SAME_STEPS, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr[-3000:]

    zero3, reference = losses(tmp_path / "zero3"), losses(tmp_path / "single")
    assert zero3.keys() == reference.keys() == set(range(1, 7))
    for step in reference:
        assert zero3[step] == pytest.approx(reference[step], rel=1e-5)
    ours, expected = adapter(tmp_path / "zero3"), adapter(tmp_path / "single")
    assert ours.keys() == expected.keys()
    for key in expected:
        assert ours[key].shape == expected[key].shape  # gathered, never a ZeRO-3 shape-[0] shard
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-4, atol=2e-5)
    assert sorted(p.name for p in (tmp_path / "zero3" / "checkpoints").iterdir()) == ["step-3", "step-6"]
