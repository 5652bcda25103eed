"""The built-in job under the deepspeed launcher on ZeRO-3: 2 CPU processes against 1 (the README's command)
with gradient accumulation 2.

Both runs draw A the same way (rank 0 draws it under zero.Init); a plain single-process run draws it in
another order, so it is not the reference here (tests/test_deepspeed_engine.py compares against one with a
shared initial adapter).
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch

from tests.test_train import ONE_THREAD, REPO, adapter, losses

pytest.importorskip("deepspeed")

# The same global batch of 8 and no dropout (each rank draws its own masks), so both runs compute the same.
SAME_STEPS = ["--max-steps", "6", "--micro-batch-size", "4", "--global-batch-size", "8", "--seq-len", "96",
              "--lora-dropout", "0", "--save-every", "3", "--lr", "1e-2"]


def free_port() -> int:
    with socket.socket() as s:  # other jobs on the machine may hold DeepSpeed's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_run(out, processes: int, *options) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()),
               *(["--num_gpus", str(processes)] if processes > 1 else []),
               "launch/train.py", "--config", "ds_configs/zero3.json", "--output-dir", str(out), *options]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420,
                          env=dict(ONE_THREAD, DS_ACCELERATOR="cpu"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_zero3_on_two_processes_matches_the_readme_command_on_one(tmp_path):
    sharded = deepspeed_run(tmp_path / "two", 2, *SAME_STEPS)
    assert "deepspeed, 2 process(es) | micro 4 x accum 1 x 2 = global 8" in sharded.stdout
    single = deepspeed_run(tmp_path / "one", 1, *SAME_STEPS)  # DeepSpeed's own gradient accumulation
    assert "deepspeed, 1 process(es) | micro 4 x accum 2 x 1 = global 8" in single.stdout

    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert two.keys() == one.keys() == set(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    assert one[6] < one[1] - 0.2
    ours, expected = adapter(tmp_path / "two"), adapter(tmp_path / "one")
    assert ours.keys() == expected.keys()
    for key in expected:
        assert ours[key].shape == expected[key].shape  # gathered, never a ZeRO-3 shape-[0] shard
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-4, atol=2e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-3", "step-6"]
