"""`lorafa-scale launch`: the exact multi-node Slurm job for a preset, with the batch-size arithmetic done.

    lorafa-scale launch --preset llama-2-13b --nodes 2 --gpus-per-node 8 --global-batch-size 128 \\
        --output-dir runs/13b -- --dataset data.jsonl

writes runs/13b/slurm/job.sbatch: launch/slurm/deepspeed.sbatch (or fsdp.sbatch) with its #SBATCH values
filled in and the training options set, then prints it, the gradient accumulation
global / (micro x nodes x GPUs per node), the memory each GPU needs (planner.py), and each node's hostfile
and launch command, obtained by running the script itself under a stand-in Slurm environment in dry-run
mode (so what is printed is what the nodes run). --dry-run prints the same and writes nothing.
Options after `--` go to launch/train.py unchanged; they are checked with the trainer's own parser first.
Options share the trainer's names (--micro-batch-size, --global-batch-size, --config, --fsdp, ...).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from ..cli_args import Parser, RawDescriptionHelpFormatter, add_renamed
from ..config import ConfigError
from ..engines.deepspeed_config import read_ds_config, zero_stage
from .hostlist import expand_nodelist
from .presets import GEOMETRIES, Preset, preset_from

REPO_ROOT = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO_ROOT / "launch" / "slurm"
TEMPLATES = {"deepspeed": "deepspeed.sbatch", "fsdp": "fsdp.sbatch"}
# A value on an #SBATCH line is taken literally (Slurm expands no shell variables there).
SBATCH_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%+/=\[\]-]+$")


def gradient_accumulation(global_batch: int, micro_batch: int, nodes: int, gpus_per_node: int) -> int:
    """Micro-batches per optimizer step on each GPU: global / (micro x nodes x GPUs per node)."""
    for name, value in (("global batch", global_batch), ("micro batch", micro_batch), ("nodes", nodes),
                        ("GPUs per node", gpus_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    per_pass = micro_batch * nodes * gpus_per_node
    if global_batch % per_pass:
        below, above = global_batch // per_pass * per_pass, (global_batch // per_pass + 1) * per_pass
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ConfigError(
            f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x {nodes} nodes x "
            f"{gpus_per_node} GPUs per node = {per_pass}; use a global batch of {nearest}, or change the others")
    return global_batch // per_pass


def node_names(nodelist: str) -> list[str]:
    try:
        return expand_nodelist(nodelist)
    except ValueError as err:
        raise ConfigError(f"--nodelist: {err}") from None


def parse_sbatch_options(script: str) -> dict[str, str]:
    """{option: value} of the script's `#SBATCH --option=value` lines, in order ("" for a bare flag)."""
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            options[key.strip()] = value.strip()
    return options


def render_sbatch(template: str, options: dict[str, str], preamble: list[str]) -> str:
    """The template with its #SBATCH block replaced by `options` and `preamble` lines right after it."""
    lines = template.splitlines()
    body_start = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) + 1
    header = [line for line in lines[:body_start] if not line.startswith("#SBATCH")]
    sbatch = [f"#SBATCH --{key}={value}" if value else f"#SBATCH --{key}" for key, value in options.items()]
    return "\n".join(header + sbatch + preamble + lines[body_start:]) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lorafa-scale launch", description=__doc__, usage="%(prog)s [options] "
               "[-- launch/train.py options]", formatter_class=RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--preset", help=f"a model of lorafa_scale/jobs/presets.py ({', '.join(GEOMETRIES)}), or a local model folder "
        "(or its config.json) of a Llama-layout model, whose size picks the defaults")
    add("--model", help="Hugging Face id or local folder to train (default: the preset's Hugging Face id, or the "
        "folder given as --preset)")
    add("--nodes", type=int, help="nodes in the job")
    add("--gpus-per-node", type=int, default=8, help="GPUs (training processes) per node")
    add("--global-batch-size", dest="global_batch", type=int, help="examples per optimizer step over all GPUs")
    group = p.add_argument_group("overrides of the preset")
    group.add_argument("--micro-batch-size", dest="micro_batch", type=int,
                       help="examples per forward pass on each GPU (default: the preset's)")
    group.add_argument("--seq-len", type=int, help="tokens per example")
    group.add_argument("--r", type=int, help="adapter rank")
    group.add_argument("--lora-alpha", type=int, help="scaling numerator (s = lora_alpha / r)")
    group.add_argument("--fast-adapter-rank", type=int, help="rows of A calibrated from training batches before step 0")
    group.add_argument("--target-modules", nargs="+", help="layer names to adapt, or all-linear")
    group.add_argument("--lora-dropout", type=float, help="dropout on the adapter input")
    group.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations in backward")
    group.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                       help="FSDP2 via torchrun (fsdp.sbatch) instead of DeepSpeed (default: DeepSpeed)")
    group.add_argument("--config", dest="deepspeed_config",
                       help="DeepSpeed JSON config (default: the preset's, in ds_configs/)")
    slurm = p.add_argument_group("Slurm")
    slurm.add_argument("--time", default="24:00:00", help="time limit per attempt; the job requeues itself after it")
    slurm.add_argument("--partition", help="#SBATCH --partition")
    slurm.add_argument("--account", help="#SBATCH --account")
    slurm.add_argument("--job-name", help="#SBATCH --job-name (default: lorafa-<preset>)")
    slurm.add_argument("--nodelist", help="run on these nodes (Slurm host list, e.g. gpu[01-02]); also used to "
                       "print the hostfile and each node's command with their real names")
    slurm.add_argument("--master-port", type=int, help="rendezvous port on the head node (default 29500)")
    slurm.add_argument("--warning-seconds", type=int, default=600,
                       help="seconds before the time limit at which the trainer is told to finish its step and "
                       "checkpoint (--signal); allow a step plus a checkpoint write")
    add("--output-dir", help="training output directory (default: runs/<preset>)")
    add("--job-dir", help="where job.sbatch is written (default: <output-dir>/slurm)")
    add("--overwrite", action="store_true", help="replace an existing job.sbatch")
    add("--dry-run", action="store_true", help="print the job and write nothing")
    add_renamed(p, "--global-batch", "--global-batch-size", type=int)
    add_renamed(p, "--micro-batch", "--micro-batch-size", type=int)
    add_renamed(p, "--deepspeed-config", "--config")
    add_renamed(p, "--strategy", "--fsdp", convert=_strategy_to_fsdp, choices=list(TEMPLATES), note="--fsdp or --no-fsdp")
    return p


def _strategy_to_fsdp(value: str) -> bool:
    return value == "fsdp"


def _preset(args) -> Preset:
    overrides = dict(model=args.model, micro_batch=args.micro_batch, seq_len=args.seq_len, r=args.r,
                     lora_alpha=args.lora_alpha, fast_adapter_rank=args.fast_adapter_rank,
                     target_modules=args.target_modules, lora_dropout=args.lora_dropout,
                     gradient_checkpointing=args.gradient_checkpointing,
                     strategy=None if args.fsdp is None else ("fsdp" if args.fsdp else "deepspeed"),
                     deepspeed_config=args.deepspeed_config)
    try:
        preset = preset_from(args.preset, **overrides)
    except ConfigError as err:
        raise ConfigError(f"--preset: {str(err).removeprefix('preset: ')}") from None
    if preset.strategy not in TEMPLATES:
        raise ConfigError(f"a multi-node job runs DeepSpeed or FSDP2 (--fsdp), not {preset.strategy!r}")
    return preset


def _train_args(preset: Preset, args, extra: list[str]) -> list[str]:
    targets = preset.target_modules if isinstance(preset.target_modules, list) else [preset.target_modules]
    train = ["--model", preset.model, "--output-dir", args.output_dir,
             "--micro-batch-size", str(preset.micro_batch), "--global-batch-size", str(args.global_batch),
             "--seq-len", str(preset.seq_len), "--r", str(preset.r), "--lora-alpha", str(preset.lora_alpha),
             "--fast-adapter-rank", str(preset.fast_adapter_rank), "--lora-dropout", str(preset.lora_dropout),
             "--target-modules", *targets,
             "--gradient-checkpointing" if preset.gradient_checkpointing else "--no-gradient-checkpointing"]
    return train + extra


def _check_train_options(preset: Preset, args, extra: list[str]) -> None:
    """The job's trainer options, checked by the trainer's own parser now rather than on the cluster."""
    from ..training.args import check_options

    engine = ["--fsdp"] if preset.strategy == "fsdp" else ["--config", preset.deepspeed_config]
    try:
        check_options([*engine, *_train_args(preset, args, extra)])
    except ConfigError as err:
        own = [s for a in build_parser()._actions for s in a.option_strings]
        misplaced = next((t for t in extra if t.split("=")[0] in own and t.startswith("--")), None)
        hint = f" ({misplaced} is an option of lorafa-scale launch: put it before --)" if misplaced else ""
        raise ConfigError(f"options after -- (for launch/train.py): {err}{hint}") from None


def _sbatch_options(template: str, args, preset: Preset) -> dict[str, str]:
    options = parse_sbatch_options(template)
    options.update({"job-name": args.job_name or f"lorafa-{preset.name}", "nodes": str(args.nodes),
                    "gpus-per-node": str(args.gpus_per_node), "time": args.time,
                    "signal": f"B:USR1@{args.warning_seconds}", "chdir": os.getcwd(),
                    "output": str(Path(args.job_dir).resolve() / "%x-%j.out"),
                    "error": str(Path(args.job_dir).resolve() / "%x-%j.err")})
    for key in ("partition", "account", "nodelist"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    for key, value in options.items():
        if value and not SBATCH_VALUE.match(value):
            raise ConfigError(f"#SBATCH --{key}={value}: Slurm takes these values literally; use no spaces, "
                              "quotes or $variables")
    return options


def _planner_strategy(ds_config: Path | None) -> str:
    """The planner's name for how the job shards: FSDP2 (no DeepSpeed config) or the config's ZeRO stage."""
    if ds_config is None:
        return "fsdp2"
    config, _ = read_ds_config(ds_config)
    if zero_stage(config) < 3:
        return "zero2"
    offload = config["zero_optimization"].get("offload_param", {}).get("device", "none") != "none"
    return "zero3-offload" if offload else "zero3"


def _memory_plan(preset: Preset, args, ds_config: Path | None) -> str:
    from .planner import ALL_TARGETS, Job, format_plan, plan

    targets = ALL_TARGETS if preset.target_modules == "all-linear" else tuple(preset.target_modules)
    job = Job(geometry=preset.geometry, strategy=_planner_strategy(ds_config), nodes=args.nodes,
              gpus_per_node=args.gpus_per_node, micro_batch=preset.micro_batch, seq_len=preset.seq_len,
              r=preset.r, targets=targets, lora_dropout=preset.lora_dropout,
              gradient_checkpointing=preset.gradient_checkpointing, fast_adapter_rank=preset.fast_adapter_rank)
    return format_plan(plan(job))


def node_commands(script: str, nodes: int, nodelist: str | None) -> str:
    """Each node's hostfile and launch command: the script run with LORAFA_DRY_RUN=1 in a stand-in Slurm
    environment (node names from `nodelist`, else node1..nodeN)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not the allocation we run in
    env.update({"LORAFA_DRY_RUN": "1", "SLURM_JOB_ID": "JOBID", "SLURM_NNODES": str(nodes),
                "SLURM_JOB_NODELIST": nodelist or f"node[1-{nodes}]",
                # the script calls python by name: this one's, even when its venv is not activated
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    result = subprocess.run(["bash", "-s"], input=script, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise ConfigError(f"rendering the job failed: {result.stderr.strip()}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    try:
        return _launch(args, extra, argv)
    except ConfigError as err:
        print(f"lorafa-scale launch: {err}", file=sys.stderr)
        return 2


def _launch(args, extra: list[str], argv: list[str]) -> int:
    for name, option in (("preset", "--preset"), ("nodes", "--nodes"), ("global_batch", "--global-batch-size")):
        if getattr(args, name) is None:
            raise ConfigError(f"{option} is required")
    preset = _preset(args)
    accum = gradient_accumulation(args.global_batch, preset.micro_batch, args.nodes, args.gpus_per_node)
    if args.nodelist and len(node_names(args.nodelist)) != args.nodes:
        raise ConfigError(f"--nodelist {args.nodelist} names {len(node_names(args.nodelist))} nodes, "
                          f"--nodes is {args.nodes}")
    args.output_dir = args.output_dir or f"runs/{preset.name}"
    args.job_dir = args.job_dir or str(Path(args.output_dir) / "slurm")
    ds_config = None
    if preset.strategy == "deepspeed":
        # the preset's config is in the repository; one given on the command line is relative to here
        ds_config = (Path(args.deepspeed_config) if args.deepspeed_config else REPO_ROOT / preset.deepspeed_config)
        if not ds_config.is_file():
            raise ConfigError(f"--config: {ds_config} not found")
        ds_config = ds_config.resolve()
    job_file = Path(args.job_dir) / "job.sbatch"

    _check_train_options(preset, args, extra)
    template = (SLURM_DIR / TEMPLATES[preset.strategy]).read_text()
    command = shlex.join(["lorafa-scale", "launch", *argv]).replace("\n", "\\n")  # stays one comment line
    preamble = [f"# Written by: {command}", f"export LORAFA_ROOT={shlex.quote(str(REPO_ROOT))}",
                f"export GPUS_PER_NODE={args.gpus_per_node}",
                f"export SHUTDOWN_TIMEOUT={args.warning_seconds}"]  # torchrun waits as long for the checkpoint
    if ds_config is not None:
        preamble.append(f"export LORAFA_DS_CONFIG={shlex.quote(str(ds_config))}")
    if args.master_port:
        preamble.append(f"export MASTER_PORT={args.master_port}")
    preamble.append(f"set -- {shlex.join(_train_args(preset, args, extra))} \"$@\"")
    script = render_sbatch(template, _sbatch_options(template, args, preset), preamble)
    # The same command again finds its own job there and leaves it; a different job is refused.
    unchanged = job_file.is_file() and job_file.read_text() == script
    if job_file.exists() and not unchanged and not args.overwrite and not args.dry_run:
        raise ConfigError(f"{job_file} holds another job; pass --overwrite to replace it, or choose another "
                          "--job-dir (or --output-dir)")
    nodes_text = node_commands(script, args.nodes, args.nodelist)

    world = args.nodes * args.gpus_per_node
    print(f"{preset.name} ({preset.model}): LoRA-FA r={preset.r} alpha={preset.lora_alpha} "
          f"fast_adapter_rank={preset.fast_adapter_rank}, {preset.strategy}, {args.nodes} nodes x "
          f"{args.gpus_per_node} GPUs = {world} processes")
    print(f"gradient accumulation = global {args.global_batch} / (micro {preset.micro_batch} x {args.nodes} nodes "
          f"x {args.gpus_per_node} GPUs) = {accum}; {args.global_batch * preset.seq_len} tokens per step at most")
    print(f"\n# memory per GPU (lorafa_scale/jobs/planner.py)\n{_memory_plan(preset, args, ds_config)}")
    print(f"\n# {job_file}\n{script}\n# what each node runs\n{nodes_text}")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    if unchanged:
        print(f"{job_file} already holds this job, unchanged; submit with: sbatch {shlex.quote(str(job_file))}")
        return 0
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(script)
    print(f"written {job_file}; submit with: sbatch {shlex.quote(str(job_file))}")
    return 0
