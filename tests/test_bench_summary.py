"""The fast-adaptation benchmark's tables (bench/adaptation.py summarize): each method at its best rate, and
"steps to PEFT LoRA's final" read from PEFT LoRA's runs beside them or from a reference file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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


def settings(**changed) -> dict:
    return dict(dict(steps=16, warmup=2, eval_every=4, max_grad_norm=0.0, calib_batches=4), **changed)


def write(path: Path, runs: list[dict]) -> Path:
    path.write_text(json.dumps({"runs": runs}))
    return path


def exit_message(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as raised:
        adaptation.main(argv)
    return str(raised.value.code)


def test_summarize_refuses_to_merge_runs_made_under_other_settings(tmp_path, capsys):
    at2 = write(tmp_path / "w2.json", [dict(run("ours-k0", 5e-3, 0, [4.0, 1.0]), settings=settings())])
    at4 = write(tmp_path / "w4.json", [dict(run("ours-k16-a80", 5e-3, 0, [4.0, 0.5]), settings=settings(warmup=4))])
    message = exit_message(["--summarize", str(at2), str(at4), "--out", str(tmp_path / "merged.json"),
                            "--lrs", "5e-3", "--methods", "ours-k0", "ours-k16-a80"])
    assert "w4.json has runs with warmup 4" in message and "w2.json has warmup 2" in message
    assert not (tmp_path / "merged.json").exists()
    # runs from before settings were recorded pass (their file names say their settings), and the table names the warmup
    legacy = write(tmp_path / "legacy.json", [run("ours-k16-a80", 5e-3, 0, [4.0, 0.5])])
    assert adaptation.main(["--summarize", str(at2), str(legacy), "--out", str(tmp_path / "merged.json"), "--lrs", "5e-3",
                            "--methods", "ours-k0", "ours-k16-a80"]) == 0
    assert len(json.loads((tmp_path / "merged.json").read_text())["runs"]) == 2
    assert "mean of seeds; warmup 2, 16 steps)" in capsys.readouterr().out
    # merging into one of the inputs adds to it, but never drops its runs that the command did not ask for
    assert adaptation.main(["--summarize", str(at2), str(legacy), "--out", str(at2), "--lrs", "5e-3",
                            "--methods", "ours-k0", "ours-k16-a80"]) == 0
    assert len(json.loads(at2.read_text())["runs"]) == 2
    assert "1 of its runs are outside" in exit_message(["--summarize", str(at2), "--out", str(at2), "--lrs", "5e-3",
                                                        "--methods", "ours-k0"])
    assert len(json.loads(at2.read_text())["runs"]) == 2
    # an existing summary that is not an input is never overwritten
    assert "is not a --summarize file" in exit_message(["--summarize", str(legacy), "--out", str(at2), "--lrs", "5e-3",
                                                        "--methods", "ours-k16-a80"])
    assert len(json.loads(at2.read_text())["runs"]) == 2
    # a reference evaluated more often is fine; one trained for other steps is not
    fine = write(tmp_path / "fine.json", [dict(run("peft-lora", 5e-3, 0, [4.0, 2.0, 1.0]), settings=settings(eval_every=1))])
    longer = write(tmp_path / "long.json", [dict(run("peft-lora", 5e-3, 0, [4.0, 2.0, 1.0]), settings=settings(steps=32))])
    common = ["--summarize", str(at2), "--lrs", "5e-3"]
    assert adaptation.main(common + ["--out", str(tmp_path / "ref.json"), "--reference", str(fine)]) == 0
    assert "long.json has runs with steps 32" in exit_message(common + ["--out", str(tmp_path / "long_ref.json"),
                                                                        "--reference", str(longer)])


def test_a_run_never_resumes_into_or_overwrites_other_results(tmp_path):
    out = write(tmp_path / "out.json", [dict(run("ours-k0", 5e-3, 0, [4.0, 1.0]), settings=settings())])
    before = out.read_text()
    # both refusals come before the model is loaded (the SmolLM2 cache is not needed to see them)
    assert "pass --resume" in exit_message(["--out", str(out)])
    assert "this command has warmup 4" in exit_message(["--out", str(out), "--resume", "--warmup", "4", "--steps", "16"])
    assert out.read_text() == before
