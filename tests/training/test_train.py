"""The training job end to end: the embedded default, exact resume after SIGTERM/SIGUSR1, gradient
accumulation equivalence, non-finite losses, and the bad-input errors of the command line."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorafa_scale import PeftModel
from lorafa_scale.engines.strategy import Strategy
from lorafa_scale.training import loop
from lorafa_scale.training.args import parse_args
from lorafa_scale.training.checkpoint import complete_checkpoints
from lorafa_scale.training.data import IGNORE_INDEX, load_dataset
from lorafa_scale.training.embedded import build_tokenizer
from lorafa_scale.training.metrics import read_metrics
from tests.tiny_models import save_tiny_llama

REPO = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(REPO / "launch" / "train.py")]
# A short run of the built-in job: small batches and sequences, dropout on (so RNG restore matters).
SHORT = ["--micro-batch-size", "1", "--global-batch-size", "2", "--seq-len", "48", "--save-every", "0",
         "--lr", "5e-3", "--warmup-steps", "3"]


# Runs use one thread: bitwise comparisons need a fixed thread count (MKL may otherwise change its threads,
# and so its summation order, with the machine's load), and one thread never stalls on a busy machine.
# MKL_CBWR=AUTO,STRICT: MKL's results then do not depend on how its inputs happen to be aligned in memory,
# which may differ between two processes (once, in CI, a resumed run's adapter was not bitwise the uninterrupted
# run's though every loss matched; not reproduced since, so this is a guess at the cause).
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_CBWR="AUTO,STRICT")


def run_train(*options, timeout=300, env=ONE_THREAD) -> subprocess.CompletedProcess:
    return subprocess.run(TRAIN + [str(o) for o in options], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(autouse=True)
def keep_thread_count():
    """In-process runs of the built-in job set one thread; later tests get their thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def adapter(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "adapter" / "adapter_model.safetensors"))


def losses(directory) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(directory) / "metrics.jsonl") if "loss" in r}


def test_embedded_default_end_to_end_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    done = run_train("--output-dir", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lorafa-scale: done, 100 steps" in done.stdout
    curve = losses(out)
    assert sorted(curve) == list(range(1, 101))
    first, last10 = curve[1], sum(curve[s] for s in range(91, 101)) / 10
    assert last10 < first - 0.8, (first, last10)
    # The default warmup is a tenth of the run (10 of 100 steps), up to the default peak rate 5e-3.
    assert "lr 0.005, warmup 10 | steps 0->100" in done.stdout
    rates = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r}
    assert rates[1] == pytest.approx(5e-4) and rates[10] == pytest.approx(5e-3) and rates[100] < 1e-5
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "run_config.json").read_text())["global_batch_size"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-100", "step-50"]

    # The adapter is PEFT's format: PEFT loads it on the saved base model and gives our model's logits.
    from peft import PeftModel as PeftPeftModel

    ids = torch.randint(0, 262, (2, 20), generator=torch.Generator().manual_seed(0))
    theirs = PeftPeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out / "adapter")
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out / "adapter")
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(out / "base_model")(ids).logits
        ours_logits = ours(ids).logits
        assert not torch.allclose(ours_logits, reference, atol=1e-3)  # the adapter changed the model
        torch.testing.assert_close(theirs(ids).logits, ours_logits, rtol=1e-5, atol=1e-5)

    # Running again into the same dir is refused, before anything is written.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_train("--output-dir", out)
    assert again.returncode == 2
    assert "Traceback" not in again.stderr
    # the error names the command as typed (here the script's path)
    assert again.stderr.splitlines()[-1].startswith(f"{TRAIN[1]}: error: --output-dir {out} holds another run")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def _interrupt(out, signum, after_step, extra=()) -> int:
    """Run with --resume auto, send `signum` once metrics.jsonl reaches after_step; return the exit code."""
    child = subprocess.Popen(TRAIN + ["--output-dir", str(out), "--resume", "auto", *SHORT, *extra],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    try:
        deadline = time.monotonic() + 240
        while max(losses(out), default=0) < after_step:
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=240)
    finally:
        child.kill()
    assert "stop signal received; checkpoint at step" in stderr, stderr[-3000:]
    return child.returncode


def test_resume_after_sigterm_and_sigusr1_matches_an_uninterrupted_run(tmp_path):
    steps = ["--max-steps", "40"]
    whole = run_train("--output-dir", tmp_path / "whole", *SHORT, *steps)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "interrupted"
    assert _interrupt(out, signal.SIGTERM, 5, steps) == loop.EXIT_PREEMPTED
    first_stop = max(losses(out))
    assert [s for s, _ in complete_checkpoints(out)] == [first_stop]
    assert _interrupt(out, signal.SIGUSR1, first_stop + 5, steps) == loop.EXIT_PREEMPTED
    assert max(losses(out)) < 40
    resumed = run_train("--output-dir", out, "--resume", "auto", *SHORT, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert losses(out) == losses(tmp_path / "whole")  # every step's loss, exactly
    expected, got = adapter(tmp_path / "whole"), adapter(out)
    assert expected.keys() == got.keys()
    differing = {k: float((expected[k] - got[k]).abs().max()) for k in expected if not torch.equal(expected[k], got[k])}
    assert not differing, differing  # bitwise
    assert any(k.endswith("lora_B.weight") and got[k].abs().sum() > 0 for k in got)


def test_resume_keeps_the_calibrated_a_bit_for_bit_and_never_recalibrates(tmp_path):
    out, calibrated = tmp_path / "run", ["--fast-adapter-rank", "4", "--calibration-batches", "2"]
    first = run_train("--output-dir", out, *SHORT, "--max-steps", "3", *calibrated)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "lorafa-scale: calibrated 4 fast rows of A in 28 layers on 2 training batches (4 micro" in first.stdout
    a_after_calibration = {k: v for k, v in adapter(out).items() if ".lora_A." in k}
    checkpointed = load_file(str(next((out / "checkpoints").iterdir()) / "adapter_model.safetensors"))
    resumed = run_train("--output-dir", out, "--resume", "auto", *SHORT, "--max-steps", "6", *calibrated)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "calibrated" not in resumed.stdout + resumed.stderr  # neither recalibrated nor warned
    assert max(losses(out)) == 6
    final = adapter(out)
    assert all(torch.equal(final[k], a) for k, a in a_after_calibration.items())
    assert all(torch.equal(checkpointed[k], a) for k, a in a_after_calibration.items())  # the checkpoint holds it


def _in_process(out, *options) -> int:
    return loop.main(["--output-dir", str(out), *map(str, options)])


def test_gradient_accumulation_equals_a_large_micro_batch(tmp_path):
    # a random A: calibration on differently shaped micro-batches differs by float rounding, which the tiny
    # model's flat gradient spectrum amplifies in the fast rows' directions
    common = ["--max-steps", "4", "--global-batch-size", "4", "--seq-len", "64", "--lora-dropout", "0",
              "--save-every", "0", "--lr", "1e-2", "--fast-adapter-rank", "0"]
    assert _in_process(tmp_path / "accum", "--micro-batch-size", "1", *common) == 0
    assert _in_process(tmp_path / "micro", "--micro-batch-size", "4", *common) == 0
    accum, micro = losses(tmp_path / "accum"), losses(tmp_path / "micro")
    assert accum.keys() == micro.keys() == {1, 2, 3, 4}
    for step in accum:
        assert accum[step] == pytest.approx(micro[step], rel=1e-5)
    a, b = adapter(tmp_path / "accum"), adapter(tmp_path / "micro")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)  # Adam divides tiny gradients by their size
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B.weight"))


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path, model_dir):
    for flag, expected in (([], False), (["--gradient-checkpointing"], True)):
        model = loop.build_model(parse_args(["--model", str(model_dir), *flag]), Strategy())
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is expected
    common = ["--max-steps", "3", "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-len", "64",
              "--save-every", "0", "--lr", "1e-2"]  # dropout on: recomputation must redraw the same masks
    assert _in_process(tmp_path / "plain", *common) == 0
    assert _in_process(tmp_path / "recompute", "--gradient-checkpointing", *common) == 0
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "recompute"), rel=1e-6)
    a, b = adapter(tmp_path / "plain"), adapter(tmp_path / "recompute")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5)


@pytest.fixture
def poisoned_model(tmp_path):
    """A tiny Llama whose embedding of '!' is NaN: any example containing '!' has a non-finite loss."""
    tokenizer = build_tokenizer()
    path = save_tiny_llama(tmp_path / "model", vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("!")] = float("nan")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_non_finite_losses_skip_the_step_and_too_many_stop_the_run(tmp_path, poisoned_model, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}" + ("!" if i % 3 == 0 else "")}) + "\n"
                            for i in range(12)))
    options = ["--model", poisoned_model, "--dataset", data, "--micro-batch-size", "1", "--global-batch-size",
               "1", "--max-steps", "12", "--lora-dropout", "0", "--save-every", "0"]
    assert _in_process(tmp_path / "mixed", *options) == 0
    records = [r for r in read_metrics(tmp_path / "mixed" / "metrics.jsonl") if "loss" in r]
    skipped = [r["step"] for r in records if r["skipped"]]
    assert len(skipped) == 4  # the four examples with '!', one per step
    assert all(r["loss"] is None for r in records if r["skipped"])
    assert all(torch.isfinite(t).all() for t in adapter(tmp_path / "mixed").values())

    data.write_text("".join(json.dumps({"text": f"bad {i}!"}) + "\n" for i in range(12)))
    capsys.readouterr()
    assert _in_process(tmp_path / "bad", *options, "--max-nonfinite-steps", "3") == loop.EXIT_DIVERGED
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().err
    assert [s for s, _ in complete_checkpoints(tmp_path / "bad")] == [3]
    saved = load_file(str(tmp_path / "bad" / "checkpoints" / "step-3" / "adapter_model.safetensors"))
    assert all(saved[k].abs().sum() == 0 for k in saved if k.endswith("lora_B.weight"))  # no step was taken


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    save_tiny_llama(path, vocab_size=262)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "make_options, message",
    [
        (lambda d, m: ["--model", m, "--dataset", d / "missing.jsonl"], "--dataset: {d}/missing.jsonl not found"),
        (lambda d, m: ["--model", m, "--dataset", d / "bad.jsonl"], "{d}/bad.jsonl:2: invalid JSON"),
        (lambda d, m: ["--micro-batch-size", "3", "--global-batch-size", "4"], "is not a multiple of"),
        (lambda d, m: ["--config", d / "ds.json"], "{d}/ds.json: invalid JSON at line 1"),
        (lambda d, m: ["--epoch", "2"], "unknown option --epoch; did you mean --epochs?"),
        (lambda d, m: ["--resume", d], "{d}: not a checkpoint for 1 process"),
        (lambda d, m: ["--r", "8", "--fast-adapter-rank", "9"], "--fast-adapter-rank must be between 0 and --r 8"),
        (lambda d, m: ["--calibration-batches", "-1"], "--calibration-batches must not be negative"),
        (lambda d, m: ["--fast-adapter-angle", "95"], "--fast-adapter-angle must be between 0 and 90 degrees, got 95.0"),
    ],
)
def test_bad_input_is_a_one_line_error_before_any_work(tmp_path, model_dir, capsys, make_options, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "oops}\n')
    (tmp_path / "ds.json").write_text('{"zero_optimization": }')
    out = tmp_path / "out"
    assert _in_process(out, *make_options(tmp_path, model_dir)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lorafa-scale train: error: ")]
    assert len(errors) == 1 and message.format(d=tmp_path) in errors[0], err
    assert not (out / "run_config.json").exists() and not (out / "checkpoints").exists()


def test_validation_loss_is_the_mean_token_loss_of_the_held_out_examples(tmp_path, model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))})
                            + "\n" for i in range(1, 13)))
    out = tmp_path / "out"
    assert _in_process(out, "--model", model_dir, "--dataset", data, "--eval-every", "2", "--val-fraction", "0.25",
                       "--max-steps", "4", "--micro-batch-size", "2", "--save-every", "0", "--lr", "1e-2") == 0
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r}
    assert sorted(evals) == [2, 4] and evals[4] < evals[2]

    tokenizer = build_tokenizer()
    held_out = load_dataset(data, tokenizer, 256, val_fraction=0.25, seed=0).validation
    assert len(held_out) == 3
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    total = count = 0.0
    with torch.no_grad():
        for example in held_out:  # one at a time, no padding: an independent reference
            logits = model(torch.tensor([example.input_ids])).logits[0, :-1].double()
            labels = torch.tensor(example.labels[1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((labels != IGNORE_INDEX).sum())
    assert evals[4] == pytest.approx(float(total / count), rel=1e-5)


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_named_before_any_work(tmp_path, capsys, tracker):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed")
    assert _in_process(tmp_path / "out", "--report-to", tracker) == 2
    assert f"--report-to {tracker} needs the '{tracker}' package" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_is_not_resumed_with_options_that_change_its_data(tmp_path, model_dir, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(8)))
    options = ["--model", model_dir, "--dataset", data, "--max-steps", "2", "--save-every", "1"]
    assert _in_process(tmp_path / "out", *options) == 0
    assert _in_process(tmp_path / "out", *options, "--resume", "auto", "--seed", "1") == 2
    assert "cannot resume with different options (--seed 0 -> 1)" in capsys.readouterr().err
    assert _in_process(tmp_path / "out", *options, "--overwrite", "--max-steps", "1") == 0
    assert [s for s, _ in complete_checkpoints(tmp_path / "out")] == [1]
    assert sorted(losses(tmp_path / "out")) == [1]

