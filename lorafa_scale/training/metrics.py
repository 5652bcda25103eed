"""Run metrics: metrics.jsonl (one JSON object per logged step), loss.png, and optional trackers.

Only rank 0 writes. On resume, lines logged after the checkpoint's step (by a run killed before its next
checkpoint) are dropped first, so metrics.jsonl reads as one uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..config import ConfigError

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracker(report_to: str) -> None:
    """Fail at start, not at the first log, when the tracker's package is missing."""
    package = TRACKER_PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"--report-to {report_to} needs the '{package}' package: pip install {package}")


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, output_dir, enabled: bool, resume_step: int, report_to: str = "none", run_config=None):
        self.path = Path(output_dir) / METRICS_NAME
        self.plot_path = Path(output_dir) / PLOT_NAME
        self.enabled = enabled
        self.tracker = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tracker = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        elif report_to == "wandb":
            import wandb

            self.tracker = wandb.init(config=run_config, resume="allow")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is None:
            return
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if hasattr(self.tracker, "add_scalar"):
            for key, value in values.items():
                self.tracker.add_scalar(key, value, record["step"])
        else:
            self.tracker.log(values, step=record["step"])

    def plot(self) -> None:
        """Write loss.png: training loss per step, and validation loss where it was measured."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_metrics(self.path)
        fig, ax = plt.subplots(figsize=(6, 4))
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats per token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.tracker is not None:
            getattr(self.tracker, "close", getattr(self.tracker, "finish", lambda: None))()
