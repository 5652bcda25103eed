#!/usr/bin/env bash
# One Slurm task per node runs this (job.sh starts it with srun). It starts this node's training processes
# with torchrun (FSDP) or the deepspeed launcher, in the rank layout every node derives alike:
#   node rank = SLURM_NODEID; head node = first name of `scontrol show hostnames "$SLURM_JOB_NODELIST"`;
#   global rank = node rank x GPUS_PER_NODE + local rank.
# Arguments: options for launch/train.py. Environment:
#   LORAFA_LAUNCHER   torchrun | deepspeed
#   GPUS_PER_NODE     training processes on this node
#   MASTER_ADDR       rendezvous host (default: the head node)
#   MASTER_PORT       rendezvous port on MASTER_ADDR (default 29500)
#   SHUTDOWN_TIMEOUT  seconds torchrun lets workers finish a checkpoint after a signal (default 600)
#   LORAFA_HOSTFILE   where the deepspeed hostfile goes (default: a node-local temporary file)
#   LORAFA_DRY_RUN=1  print the hostfile and the command instead of running them
set -euo pipefail

: "${SLURM_JOB_NODELIST:?node.sh runs inside a Slurm job step (one task per node)}"
: "${SLURM_NODEID:?node.sh runs inside a Slurm job step (one task per node)}"
: "${GPUS_PER_NODE:?set GPUS_PER_NODE (processes per node)}"
launcher=${LORAFA_LAUNCHER:-torchrun}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# scontrol is on every Slurm node; the Python fallback (same output) lets the job be rendered elsewhere.
if command -v scontrol >/dev/null 2>&1; then
  hostnames=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  hostnames=$(python "$root/lorafa_scale/jobs/hostlist.py" "$SLURM_JOB_NODELIST")
fi
mapfile -t hosts <<<"$hostnames"
nnodes=${#hosts[@]}
if [[ -n ${SLURM_NNODES:-} && $SLURM_NNODES != "$nnodes" ]]; then
  echo "node.sh: SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST names $nnodes nodes but SLURM_NNODES=$SLURM_NNODES" >&2
  exit 2
fi
node_rank=$SLURM_NODEID
master_addr=${MASTER_ADDR:-${hosts[0]}}
master_port=${MASTER_PORT:-29500}

case $launcher in
  torchrun)
    # torchrun forwards SIGUSR1 (the time-limit warning) to the workers, which checkpoint and exit;
    # it waits SHUTDOWN_TIMEOUT seconds for them before SIGKILL. The `--` keeps torchrun from reading the
    # trainer's options as abbreviations of its own (it rejects `--r 16` as an ambiguous `--rdzv-...`).
    cmd=(torchrun --nnodes "$nnodes" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$node_rank"
         --master-addr "$master_addr" --master-port "$master_port"
         --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
         --shutdown-timeout "${SHUTDOWN_TIMEOUT:-600}"
         -- "$root/launch/train.py" "$@")
    ;;
  deepspeed)
    hostfile=${LORAFA_HOSTFILE:-${TMPDIR:-/tmp}/lorafa-hostfile-${SLURM_JOB_ID:-0}-$node_rank}
    host_lines=$(for host in "${hosts[@]}"; do echo "$host slots=$GPUS_PER_NODE"; done)
    # --no_ssh: every node starts its own processes (no pdsh); --node_rank places them.
    cmd=(deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank"
         --master_addr "$master_addr" --master_port "$master_port"
         "$root/launch/train.py" "$@")
    ;;
  *)
    echo "node.sh: LORAFA_LAUNCHER must be torchrun or deepspeed, got '$launcher'" >&2
    exit 2
    ;;
esac

if [[ ${LORAFA_DRY_RUN:-0} == 1 ]]; then
  [[ $launcher == deepspeed ]] && printf '# hostfile %s\n%s\n' "$hostfile" "$host_lines"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
if [[ $launcher == deepspeed ]]; then
  echo "$host_lines" >"$hostfile"
  # The deepspeed launchers would die of SIGUSR1; an ignored signal stays ignored in the processes they
  # start until the trainer installs its own handler, so only the trainer acts on the time-limit warning.
  trap '' USR1
fi
exec "${cmd[@]}"
