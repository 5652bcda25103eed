"""Lean mode under 2-rank DeepSpeed ZeRO-3 and FSDP2 (CPU, gloo): same loss and B gradients as lean=False."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_models import save_tiny_llama

ROOT = Path(__file__).parents[2]
WORKER = ROOT / "tests" / "workers" / "lean_sharded.py"


def torchrun(*argv) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *map(str, argv)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).splitlines()
        errors = [line for line in output if re.search(r"Error|error:|what\(\)|terminate|Traceback", line)]
        pytest.fail("\n".join(errors[-40:] + output[-20:]))


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_lean_equals_plain_when_sharded(engine, tmp_path):
    model_dir = save_tiny_llama(tmp_path / "model")
    torchrun(WORKER, engine, model_dir, tmp_path)
    results = torch.load(tmp_path / f"lean_{engine}.pt", weights_only=True)
    plain = results.pop("plain")
    assert plain["logits"] and not plain["lean"]
    for name, run in results.items():
        assert run["lean"] and not run["logits"], name  # the lean head + loss ran: no logits
        assert abs(run["loss"] - plain["loss"]) <= 1e-5 * abs(plain["loss"]), name
        assert run["grads"].keys() == plain["grads"].keys() and run["grads"]
        for key, grad in plain["grads"].items():
            assert float(grad.abs().max()) > 0
            assert float((run["grads"][key] - grad).abs().max()) <= 2e-5 * float(grad.abs().max()), (name, key)
