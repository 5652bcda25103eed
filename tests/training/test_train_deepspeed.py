"""The built-in job under the deepspeed launcher on ZeRO-3 (DS_ACCELERATOR=cpu, gloo).

The reference is the README's command, one process with gradient accumulation 2. Against it: 2 processes
stopped by SIGTERM (sent to the whole process group, as Slurm does) and resumed with --resume auto.
(tests/training/test_same_seed.py compares the engines against a plain single-process run.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from lorafa_scale.training.checkpoint import complete_checkpoints
from tests.training.test_train import ONE_THREAD, REPO, adapter, losses

pytest.importorskip("deepspeed")

# The same global batch of 8 and no dropout (each rank draws its own masks), so all runs compute the same.
# A random A: calibrated rows sum their statistics over ranks in another order (a float-level difference that
# ten steps at lr 1e-2 amplify past this test's tolerance); tests/training/test_same_seed.py covers them.
SAME_STEPS = ["--max-steps", "10", "--micro-batch-size", "4", "--global-batch-size", "8", "--seq-len", "96",
              "--lora-dropout", "0", "--save-every", "0", "--lr", "1e-2", "--fast-adapter-rank", "0"]
ENV = dict(ONE_THREAD, DS_ACCELERATOR="cpu")


def free_port() -> int:
    with socket.socket() as s:  # other jobs on the machine may hold DeepSpeed's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(out, processes: int, *options) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()),
            *(["--num_gpus", str(processes)] if processes > 1 else []),
            "launch/train.py", "--config", "ds_configs/zero3.json", "--output-dir", str(out), *SAME_STEPS, *options]


def run(command) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=420, env=ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def interrupt(command, out, after_step: int) -> str:
    """Start the launcher in its own process group; SIGTERM the group once after_step is logged."""
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while max(losses(out), default=0) < after_step:
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()[-3000:]
            time.sleep(0.02)
        os.killpg(launcher.pid, signal.SIGTERM)
        output, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    return output


def test_zero3_two_processes_preempted_and_resumed_match_the_readme_command(tmp_path):
    reference = run(deepspeed_command(tmp_path / "one", 1))  # DeepSpeed's own gradient accumulation
    assert "deepspeed, 1 process(es) | micro 4 x accum 2 x 1 = global 8" in reference.stdout

    out = tmp_path / "two"
    output = interrupt(deepspeed_command(out, 2), out, after_step=2)
    assert "stop signal received; checkpoint at step" in output, output[-3000:]
    stopped = [s for s, _ in complete_checkpoints(out)]
    assert len(stopped) == 1 and 2 <= stopped[0] < 10 and max(losses(out)) == stopped[0]
    resumed = run(deepspeed_command(out, 2, "--resume", "auto"))
    assert "deepspeed, 2 process(es) | micro 4 x accum 1 x 2 = global 8" in resumed.stdout
    assert f"steps {stopped[0]}->10 (resumed from" in resumed.stdout

    two, one = losses(out), losses(tmp_path / "one")
    assert two.keys() == one.keys() == set(range(1, 11))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    assert one[10] < one[1] - 0.2
    ours, expected = adapter(out), adapter(tmp_path / "one")
    assert ours.keys() == expected.keys()
    for key in expected:
        assert ours[key].shape == expected[key].shape  # gathered, never a ZeRO-3 shape-[0] shard
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-4, atol=2e-5)
