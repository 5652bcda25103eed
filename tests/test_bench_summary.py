"""The fast-adaptation benchmark's tables (bench/adaptation.py summarize): each method at its best rate, and
"steps to PEFT LoRA's final" read from PEFT LoRA's runs beside them or from a reference file."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import adaptation  # noqa: E402  (bench/ is scripts, not a package)


def run(method: str, lr: float, seed: int, curve: list[float]) -> dict:
    return dict(task="increment", method=method, lr=lr, seed=seed, curve=curve, calib_seconds=0.0)


def row(table: str, method: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_steps_to_peft_lora_come_from_the_reference_runs():
    # PEFT LoRA ends at 0.2 at its best rate (1e-3: the mean of its seeds; 2e-3 ends higher)
    reference = [run("peft-lora", 1e-3, 0, [4.0, 1.0, 0.3]), run("peft-lora", 1e-3, 1, [4.0, 1.0, 0.1]),
                 run("peft-lora", 2e-3, 0, [4.0, 0.5, 0.4])]
    # ours evaluated every step: at 5e-3 (its best) the mean curve first reaches 0.2 at step 3
    ours = [run("ours-k16-a80", 5e-3, 0, [4.0, 1.0, 0.5, 0.2, 0.05]), run("ours-k16-a80", 5e-3, 1, [4.0, 0.8, 0.3, 0.2, 0.07]),
            run("ours-k16-a80", 2e-3, 0, [4.0, 2.0, 1.0, 0.5, 0.3])]
    cells = row(adaptation.summarize({"runs": ours}, eval_every=1, reference=reference), "ours-k16-a80")
    assert cells[1] == "0.005" and cells[4] == "**0.0600**" and cells[5] == "3"
    assert row(adaptation.summarize({"runs": ours + reference}, eval_every=1), "ours-k16-a80")[5] == "3"
    # without PEFT LoRA anywhere there is no target: "-", not a step count
    assert row(adaptation.summarize({"runs": ours}, eval_every=1), "ours-k16-a80")[5] == "-"
    # a curve that never reaches it says so, with the last step evaluated
    slow = [run("ours-k0", 5e-3, 0, [4.0, 1.0, 0.5, 0.4, 0.3])]
    assert row(adaptation.summarize({"runs": slow}, eval_every=4, reference=reference), "ours-k0")[5] == ">16"


def test_method_names_give_k_whitening_and_angle():
    assert adaptation.ours_variant("ours-k0") == (0, 1.0, 0.0)
    assert adaptation.ours_variant("ours-k16-a80") == (16, 1.0, 80.0)
    assert adaptation.ours_variant("ours-k16-gradient") == (16, 0.0, 0.0)
    assert adaptation.ours_variant("ours-k16-gradient-a80") == (16, 0.0, 80.0)
    assert adaptation.ours_variant("ours-k16-w0.5") == (16, 0.5, 0.0)
    assert adaptation.ours_variant("ours-k16-w0.5-a80") == (16, 0.5, 80.0)
