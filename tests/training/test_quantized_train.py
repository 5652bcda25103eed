"""launch/train.py --quantization nf4 end to end: the built-in model loaded in 4 bits, trained, evaluated, saved."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import peft
import torch

from lorafa_scale import LoraFAModel
from lorafa_scale.quantization import load_model
from lorafa_scale.training.loop import EMBEDDED_BASE_DIR, ensure_embedded_base
from lorafa_scale.training.metrics import read_metrics
from tests.test_model import logits

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"


def test_launch_train_nf4_end_to_end(tmp_path):
    ensure_embedded_base(tmp_path)
    base, out = tmp_path / EMBEDDED_BASE_DIR, tmp_path / "run"
    # An evaluation between training steps: on AVX512-BF16 CPUs bitsandbytes would repack the 4-bit
    # weights for inference there, and training after it would break without the loader's fix.
    argv = [sys.executable, str(TRAIN_SCRIPT), "--model", str(base), "--quantization", "nf4", "--max-steps", "2",
            "--eval-every", "1", "--val-fraction", "0.02", "--seq-len", "64", "--output-dir", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    metrics = read_metrics(out / "metrics.jsonl")
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    eval_losses = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(train_losses) == 2 and len(eval_losses) == 2
    assert train_losses[-1] < train_losses[0] and eval_losses[1] < eval_losses[0]

    # The adapter trained on the 4-bit base gives the same logits here and in PEFT, on the same 4-bit base.
    x = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = LoraFAModel.from_pretrained(load_model(base, "nf4", torch.float32), out / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_model(base, "nf4", torch.float32), out / "adapter")
    torch.testing.assert_close(logits(theirs, x), logits(ours, x), rtol=1e-5, atol=1e-5)
    assert (logits(ours, x) - logits(load_model(base, "nf4", torch.float32), x)).abs().max() > 1e-4
