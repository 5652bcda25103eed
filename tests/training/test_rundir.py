"""Runs without --output-dir: a new folder every run, the same one for every process of one launch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorafa_scale.config import ConfigError
from lorafa_scale.training import rundir
from lorafa_scale.training.args import parse_args

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "launch" / "train.py")
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
SHORT = ["--max-steps", "2", "--seq-len", "32", "--micro-batch-size", "2", "--save-every", "0"]


def test_every_run_gets_a_new_folder_and_processes_of_one_launch_share_one(tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(key, raising=False)
    first, second = rundir.new_run_dir(1, tmp_path), rundir.new_run_dir(1, tmp_path)
    assert first != second and first.name.startswith("lorafa-20") and second.parent == tmp_path

    # Several processes started by one launcher (here: this test's parent process) agree on one folder.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    rank0, rank1 = rundir.new_run_dir(2, tmp_path), rundir.new_run_dir(2, tmp_path)
    assert rank0 == rank1 and rank0 not in (first, second)
    # A folder taken by another run under the launch's name is skipped, not shared.
    shutil.rmtree(rank0)
    rank0.mkdir()
    (rank0 / rundir.MARKER).write_text("someone else\n")
    assert rundir.new_run_dir(2, tmp_path).name == rank0.name + "-2"

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node: the nodes cannot agree
    with pytest.raises(ConfigError, match="pass --output-dir, a folder every node sees"):
        rundir.new_run_dir(2, tmp_path)


def test_output_dir_comes_from_the_command_line_then_the_environment(monkeypatch):
    monkeypatch.delenv(rundir.ENV_OUTPUT_DIR, raising=False)
    assert parse_args([], world_size=1).output_dir is None
    monkeypatch.setenv(rundir.ENV_OUTPUT_DIR, "runs/job-7")  # what job.sh exports for a Slurm job
    assert parse_args([], world_size=1).output_dir == "runs/job-7"
    assert parse_args(["--output-dir", "mine"], world_size=1).output_dir == "mine"
    assert parse_args(["--resume", "auto"], world_size=1).output_dir == "runs/job-7"
    monkeypatch.delenv(rundir.ENV_OUTPUT_DIR)
    with pytest.raises(ConfigError, match="--resume auto continues the run in --output-dir: pass --output-dir DIR"):
        parse_args(["--resume", "auto"], world_size=1)


def _run(cwd, *options, launcher=(sys.executable,)):
    return subprocess.run([*launcher, TRAIN, *map(str, options)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=ONE_THREAD)


def _run_dir(stdout: str) -> Path:
    line = next(line for line in stdout.splitlines() if line.startswith("lorafa-scale: run in "))
    return Path(line.removeprefix("lorafa-scale: run in ").split(" | ")[0])


def test_the_same_command_twice_keeps_both_runs_and_the_built_in_model_takes_any_dataset(tmp_path):
    """The README's first command, twice (the second on the user's own data, 4-bit): two runs, none refused."""
    data = tmp_path / "mine.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                    '{"instruction": "Say a word", "output": "word"}\n{"text": "plain text"}\n{"text": "more"}\n')
    first = _run(tmp_path, *SHORT)
    second = _run(tmp_path, *SHORT, "--dataset", data, "--quantization", "nf4")
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-2000:], second.stderr[-2000:])
    a, b = _run_dir(first.stdout), _run_dir(second.stdout)
    assert a != b and a.parent == b.parent == Path("runs")
    for run in (a, b):
        assert (tmp_path / run / "adapter" / "adapter_model.safetensors").is_file()
    assert f"{b}/adapter" in second.stdout  # the done line names the same folder
    # Noise that says nothing about the run stays out (DeepSpeed is imported by transformers' save_pretrained).
    assert "Setting accelerator to CPU" not in first.stdout + first.stderr
    assert "gemm_4bit_forward" not in first.stdout + first.stderr

    # A refused run leaves no empty folder behind, and names the command the user typed.
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    bad = _run(tmp_path, *SHORT, "--dataset", tmp_path / "missing.jsonl")
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].startswith(f"{TRAIN}: error: --dataset:")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    bad = _run(tmp_path, *SHORT, "--dataset", tmp_path / "bad.jsonl")  # fails after the folder was made
    assert bad.returncode == 2 and "bad.jsonl:2: " in bad.stderr, bad.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs


def test_processes_of_one_torchrun_launch_train_in_one_new_folder(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    done = _run(tmp_path, "--fsdp", *SHORT[:-4], "--micro-batch-size", "1", "--global-batch-size", "2",
                launcher=(torchrun, "--nproc_per_node", "2", "--"))
    assert done.returncode == 0, done.stderr[-3000:]
    run = _run_dir(done.stdout)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]
    assert (tmp_path / run / "adapter" / "adapter_model.safetensors").is_file()
    assert "FutureWarning" not in done.stderr
