"""A real two-"node" job on this machine: launch/slurm/fsdp.sbatch runs with the stand-in srun
(tests/jobs/slurm_stubs), which starts node.sh twice, i.e. two torchrun launches with --nnodes 2 and node ranks
0 and 1 rendezvousing on localhost (gloo, CPU), training the embedded default model. The time-limit warning
(SIGUSR1 to the batch script, as `#SBATCH --signal=B:USR1@...` sends it) makes the trainer checkpoint and
the job requeue itself; the requeued attempt resumes, and the adapter equals one uninterrupted process.
The DeepSpeed path gets the same signal on one node and must hand the trainer's exit code back.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorafa_scale.training.loop import EXIT_PREEMPTED
from tests.jobs.test_slurm import ROOT, SLURM, TRAIN, slurm_env

# lora_dropout 0: dropout masks are drawn per rank, so they differ between 1 and 2 processes.
# --r: torchrun must not take it for an abbreviation of its own options. A random A (--fast-adapter-rank 0):
# calibration sums its statistics over ranks in another order, a float-level difference (its 2-rank parity
# is tested in tests/training/test_same_seed.py); this test compares the requeued run bit-near-exactly.
TRAIN_ARGS = ["--max-steps", "12", "--seq-len", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
              "--lora-dropout", "0", "--r", "8", "--fast-adapter-rank", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_logged(output: Path) -> list[dict]:
    metrics = output / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []


def test_two_nodes_checkpoint_on_time_limit_requeue_and_match_one_process(tmp_path):
    reference = tmp_path / "one-process"
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                          str(free_port()), "--", TRAIN, "--fsdp", *TRAIN_ARGS, "--output-dir", str(reference)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]

    output, log = tmp_path / "two-nodes", tmp_path / "slurm-calls.log"
    env = slurm_env(stubs=True, SLURM_JOB_ID=901, SLURM_NNODES=2, SLURM_JOB_NODELIST="node[1-2]",
                    SLURM_SUBMIT_DIR=ROOT, GPUS_PER_NODE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(),
                    STUB_LOG=log)
    command = ["bash", str(SLURM / "fsdp.sbatch"), *TRAIN_ARGS, "--output-dir", str(output)]
    with open(tmp_path / "attempt-1.log", "w") as attempt_log:
        job = subprocess.Popen(command, env=env, stdout=attempt_log, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.monotonic() + 240
        while not steps_logged(output) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        job.send_signal(signal.SIGUSR1)  # Slurm's warning before the time limit
        assert job.wait(timeout=240) == 0, (tmp_path / "attempt-1.log").read_text()[-3000:]
    assert log.read_text().splitlines()[-1] == "scontrol requeue 901"
    stopped_at = steps_logged(output)[-1]["step"]
    assert 1 <= stopped_at < 12 and (output / "checkpoints" / f"step-{stopped_at}").is_dir()
    assert not (output / "adapter").exists()

    requeued = subprocess.run(command, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert log.read_text().count("requeue") == 1
    assert [s["step"] for s in steps_logged(output)][-1] == 12

    two, ref = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (output, reference))
    assert sorted(two) == sorted(ref) and any("lora_B" in k for k in two)
    for key in ref:
        torch.testing.assert_close(two[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)
    ref_losses = {s["step"]: s["loss"] for s in steps_logged(reference)}
    for entry in steps_logged(output):
        assert abs(entry["loss"] - ref_losses[entry["step"]]) < 1e-6 * abs(ref_losses[entry["step"]])


def test_deepspeed_node_checkpoints_on_a_signal_to_its_task_and_exits_75(tmp_path):
    """slurmstepd signals every process of a task: the deepspeed launchers (started by node.sh with SIGUSR1
    ignored) survive it, the trainer checkpoints, and its exit code 75 comes back through both launchers."""
    output = tmp_path / "out"
    env = slurm_env(SLURM_JOB_ID=56, SLURM_NNODES=1, SLURM_NODEID=0, SLURM_JOB_NODELIST="node1", GPUS_PER_NODE=1,
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), LORAFA_LAUNCHER="deepspeed",
                    DS_ACCELERATOR="cpu", LORAFA_HOSTFILE=tmp_path / "hostfile")
    command = ["bash", str(SLURM / "node.sh"), "--config", str(ROOT / "ds_configs" / "zero3.json"), *TRAIN_ARGS,
               "--max-steps", "40", "--output-dir", str(output)]
    with open(tmp_path / "node.log", "w") as node_log:
        node = subprocess.Popen(command, env=env, stdout=node_log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
        deadline = time.monotonic() + 240
        while not steps_logged(output) and node.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(node.pid, signal.SIGUSR1)
        assert node.wait(timeout=240) == EXIT_PREEMPTED, (tmp_path / "node.log").read_text()[-3000:]
    assert (tmp_path / "hostfile").read_text() == "node1 slots=1\n"
    stopped_at = steps_logged(output)[-1]["step"]
    assert stopped_at < 40 and (output / "checkpoints" / f"step-{stopped_at}").is_dir()
