#!/usr/bin/env bash
# Body of deepspeed.sbatch and fsdp.sbatch, run by Slurm on the job's first node: network settings, one
# srun task per node running node.sh, and a requeue that resumes when the time-limit warning (the sbatch
# --signal line) made the trainer checkpoint and stop.
# Arguments: options for launch/train.py. Environment, each value already set wins:
#   LORAFA_LAUNCHER      torchrun | deepspeed (set by the sbatch script)
#   GPUS_PER_NODE        training processes per node (default: the GPUs Slurm gave each node)
#   MASTER_PORT          rendezvous port on the head node (default 29500)
#   LORAFA_MAX_REQUEUES  stop requeueing after this many restarts (default 20)
#   LORAFA_DRY_RUN=1     print each node's hostfile and command (node.sh) instead of starting srun
#   LORAFA_OUTPUT_DIR    the trainer's output dir when no --output-dir is given (default runs/lorafa-slurm-<job id>)
#   NCCL_DEBUG           WARN; INFO prints the network NCCL chose, for a job that hangs at start-up
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  1: a failed or timed-out collective aborts its NCCL communicators and
#                        ends the process, so the job fails instead of hanging (torch's default 3 skips the abort)
#   Passed through when set (cluster-specific, so no default): NCCL_SOCKET_IFNAME (interface for
#   bootstrap and socket traffic, e.g. ib0 or ^lo,docker), NCCL_IB_HCA (InfiniBand adapters to use),
#   NCCL_IB_DISABLE=1 (no InfiniBand: use sockets), NCCL_NET_GDR_LEVEL (GPUDirect RDMA distance).
set -euo pipefail

: "${SLURM_JOB_ID:?job.sh runs as a Slurm batch job: sbatch launch/slurm/deepspeed.sbatch or fsdp.sbatch}"
: "${SLURM_NNODES:?job.sh runs as a Slurm batch job}"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export MASTER_PORT=${MASTER_PORT:-29500}
gpus=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}}
export GPUS_PER_NODE=${gpus##*:}  # SLURM_GPUS_PER_NODE may read "a100:8"
if [[ ! $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
  echo "job.sh: GPUS_PER_NODE='$GPUS_PER_NODE': request GPUs with #SBATCH --gpus-per-node=N or export GPUS_PER_NODE" >&2
  exit 2
fi
restarts=${SLURM_RESTART_COUNT:-0}
# Without --output-dir the trainer starts a new folder every run; a job (all its nodes, every requeued
# attempt) keeps one, so that the requeue's --resume auto finds it. An --output-dir option wins.
export LORAFA_OUTPUT_DIR=${LORAFA_OUTPUT_DIR:-runs/lorafa-slurm-$SLURM_JOB_ID}

train_args=("$@")
if ((restarts > 0)); then
  # A requeued job continues from the newest complete checkpoint; it never starts afresh.
  kept=()
  for arg in "${train_args[@]}"; do
    if [[ $arg != --overwrite ]]; then kept+=("$arg"); fi
  done
  train_args=("${kept[@]}" --resume auto)
fi
echo "job $SLURM_JOB_ID restart $restarts: $SLURM_NNODES nodes ($SLURM_JOB_NODELIST) x $GPUS_PER_NODE processes"
env | grep -E '^(NCCL_|TORCH_NCCL_|LORAFA_OUTPUT_DIR=)' | sort || true

if [[ ${LORAFA_DRY_RUN:-0} == 1 ]]; then
  for ((node = 0; node < SLURM_NNODES; node++)); do
    echo "# node $node"
    SLURM_NODEID=$node bash "$here/node.sh" "${train_args[@]}"
  done
  exit 0
fi

warned=0
# shellcheck disable=SC2317,SC2329  # reached through the trap, which shellcheck does not follow
on_time_limit_warning() {
  warned=1
  echo "job.sh: time-limit warning: asking the trainer to checkpoint and stop"
  kill -USR1 "$srun_pid" 2>/dev/null || true  # srun forwards it to every node's task
}
trap on_time_limit_warning USR1

# Since Slurm 22.05 srun does not inherit the batch's CPUs per task: give the one task all of them.
srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" \
  --kill-on-bad-exit=1 bash "$here/node.sh" "${train_args[@]}" &
srun_pid=$!
# `wait` returns early when the trap runs; wait again until srun itself has ended.
while true; do
  rc=0
  wait "$srun_pid" || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

# The trainer checkpointed and stopped: after the warning (torchrun then exits 1), or by its own exit code
# for a checkpoint on SIGUSR1/SIGTERM (the deepspeed launchers pass it on).
preempted() {
  (($1 == $(python -c 'from lorafa_scale.training.loop import EXIT_PREEMPTED; print(EXIT_PREEMPTED)')))
}
if ((rc != 0)) && { ((warned)) || preempted "$rc"; }; then
  if ((restarts < ${LORAFA_MAX_REQUEUES:-20})); then
    echo "job.sh: the trainer checkpointed and stopped (exit $rc): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "job.sh: not requeueing: already restarted $restarts times (LORAFA_MAX_REQUEUES)" >&2
fi
exit "$rc"
