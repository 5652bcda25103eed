"""Command-line options of the training job, optionally supplied by a --recipe YAML file.

`parse_args(argv)` returns a `TrainArgs` with every value checked and the derived ones resolved
(grad_accum from the batch sizes and the world size); a bad value raises ConfigError naming the option
(and the recipe file when it came from there), before anything expensive runs.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from ..cli_args import Parser
from ..config import ConfigError
from ..engines.deepspeed_config import read_ds_config
from ..fast_adapter import DEFAULT_ANGLE
from .rundir import ENV_OUTPUT_DIR

QUANTIZATION_CHOICES = ("none", "int8", "nf4", "fp4")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
REPORT_CHOICES = ("none", "tensorboard", "wandb")


@dataclass
class TrainArgs:
    """The resolved options; field names are the option names with '_' for '-'."""

    config: str | None
    model: str | None
    dataset: str | None
    output_dir: str | None  # None: a new folder per run (rundir.py), chosen when the job starts
    overwrite: bool
    max_steps: int | None
    epochs: int
    micro_batch_size: int
    global_batch_size: int
    seq_len: int
    packing: bool
    lr: float
    warmup_steps: int | None
    weight_decay: float
    max_grad_norm: float
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str]
    fast_adapter_rank: int
    calibration_batches: int
    fast_adapter_angle: float
    quantization: str
    dtype: str
    gradient_checkpointing: bool
    lean: bool
    fsdp: bool
    save_every: int
    keep_last: int
    eval_every: int
    val_fraction: float
    log_every: int
    max_nonfinite_steps: int
    resume: str
    seed: int
    report_to: str
    trust_remote_code: bool
    local_rank: int
    recipe: str | None
    grad_accum: int = 1  # derived: global_batch_size / (micro_batch_size x world size)

    @property
    def embedded(self) -> bool:
        """True when the job trains the built-in model (on the shipped sample unless --dataset is given)."""
        return self.model is None

    def to_dict(self) -> dict:
        return asdict(self)


def build_parser(prog: str = "lorafa-scale train") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Train LoRA-FA adapters (A frozen, B trained). Without --model: a small built-in "
        "Llama-style model with a byte-level tokenizer (trains on any --dataset); without --dataset: a sample "
        "dataset shipped in the package. Nothing is downloaded.",
        allow_abbrev=False,
    )
    add = p.add_argument
    add("--recipe", help="YAML file of option: value pairs (names as below, without '--'); the command line wins")
    add("--config", help="DeepSpeed JSON config (ds_configs/*.json); its \"auto\" values are filled in from these options")
    add("--fsdp", action=argparse.BooleanOptionalAction, default=False, help="shard with FSDP2 (under torchrun)")
    add("--model", help="Hugging Face model name or local directory (default: the built-in model, written to "
        "<output-dir>/base_model)")
    add("--dataset", help="JSONL file (text, alpaca or chat records), directory of JSONL files, or a directory "
        "saved by datasets' save_to_disk (default: the built-in sample)")
    add("--output-dir", help="where adapter/, checkpoints/, metrics.jsonl and loss.png go (default: "
        f"${ENV_OUTPUT_DIR} if set, else a new folder runs/lorafa-YYYYmmdd-HHMMSS for every run, named in the "
        "start-up line); a folder that holds another run is refused unless --resume or --overwrite is given")
    add("--overwrite", action="store_true", help="start afresh in an output dir that holds another run (deletes it)")
    add("--max-steps", type=int, help="optimizer steps to run (default: --epochs over the dataset)")
    add("--epochs", type=int, default=1, help="passes over the training split when --max-steps is not given")
    add("--micro-batch-size", type=int, default=4, help="examples per forward pass on each process")
    add("--global-batch-size", type=int, help="examples per optimizer step over all processes "
        "(default: micro x processes); gradient accumulation = global / (micro x processes)")
    add("--seq-len", type=int, default=256, help="tokens per example; longer examples are truncated and counted")
    add("--packing", action=argparse.BooleanOptionalAction, default=False,
        help="pack short examples together into sequences of up to --seq-len tokens")
    add("--lr", type=float, help="peak learning rate (AdamW, linear warmup then cosine decay; default: "
        f"{default_lr(1, 1, DEFAULT_ANGLE):g} with every row calibrated and turned the default {DEFAULT_ANGLE:g} "
        f"degrees, {RANDOM_A_LR:g} with a random A (--fast-adapter-rank 0), {default_lr(1, 1, 0.0):g} with the "
        "exact rows (--fast-adapter-angle 0); README, 'Fast adaptation')")
    add("--warmup-steps", type=int, help="linear warmup steps (default: a tenth of the run's steps, rounded up, "
        "as in the benchmark the default --lr comes from; 0: none)")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay on B")
    add("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0 = no clipping)")
    add("--r", type=int, default=16, help="adapter rank")
    add("--lora-alpha", type=float, default=32.0, help="scaling numerator: s = lora_alpha / r")
    add("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input")
    add("--target-modules", nargs="+", default=["all-linear"],
        help="layer names to adapt (e.g. q_proj v_proj), or all-linear")
    add("--fast-adapter-rank", type=int, help="rows of A calibrated from training batches before step 0 "
        "(0..r; default: r, every row; 0: all rows random)")
    add("--calibration-batches", type=int, default=4,
        help="global training batches the calibration of fast rows runs on (forward + backward each)")
    add("--fast-adapter-angle", type=float, default=DEFAULT_ANGLE,
        help=f"degrees (0-90) by which each calibrated row of A is turned toward a random direction "
        f"(default {DEFAULT_ANGLE:g}; 0: exactly the calibrated directions)")
    add("--quantization", default="none", choices=QUANTIZATION_CHOICES, help="load the base model quantized")
    add("--dtype", default="auto", choices=DTYPE_CHOICES,
        help="base model dtype (auto: bfloat16 on a GPU that supports it, else float32)")
    add("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
        help="recompute activations in backward to save memory")
    add("--lean", action=argparse.BooleanOptionalAction, default=True,
        help="lean mode for Llama/Mistral/Qwen2/Qwen3 (lorafa_scale.lean): chunked output head + loss, SwiGLU "
             "and RMSNorm keeping only their inputs; same loss and gradients, far less kept for backward")
    add("--save-every", type=int, default=50, help="write a resumable checkpoint every N steps (0 = only at the end)")
    add("--keep-last", type=int, default=2, help="checkpoints kept (older ones are deleted after a new one is complete)")
    add("--eval-every", type=int, default=0, help="evaluate on the validation split every N steps (0 = never)")
    add("--val-fraction", type=float, default=0.05,
        help="share of the examples held out for validation when --eval-every > 0 and the dataset has no split")
    add("--log-every", type=int, default=1, help="write metrics.jsonl every N steps")
    add("--max-nonfinite-steps", type=int, default=10,
        help="stop (with a checkpoint) after this many consecutive steps with a non-finite loss")
    add("--resume", default="never",
        help="auto (newest complete checkpoint in --output-dir, if any), never, or a checkpoint directory")
    add("--seed", type=int, default=0, help="seed for the model init, adapter init, data order and dropout")
    add("--report-to", default="none", choices=REPORT_CHOICES, help="also log metrics to this tracker")
    add("--trust-remote-code", action="store_true", help="allow the model's own Python code from the Hub")
    add("--local_rank", "--local-rank", dest="local_rank", type=int, default=0,
        help="set by the deepspeed launcher; the rank is read from the environment")
    return p


def _recipe_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """Turn a YAML recipe into command-line tokens, checking every key and value against the parser."""
    recipe = Path(path)
    if not recipe.is_file():
        raise ConfigError(f"--recipe: {path} not found")
    try:
        values = yaml.safe_load(recipe.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--recipe {path}: invalid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--recipe {path}: expected a mapping of option: value, got {type(values).__name__}")
    options = {a.dest: a for a in parser._actions if a.option_strings}
    argv = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in options or dest in ("recipe", "help"):
            close = difflib.get_close_matches(dest, list(options), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"--recipe {path}: unknown option '{key}'{hint}")
        flag = options[dest].option_strings[0]
        if isinstance(value, bool):
            if not isinstance(options[dest], (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
                raise ConfigError(f"--recipe {path}: option '{key}' takes a value, not {value}")
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    try:
        parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(f"--recipe {path}: {err}") from None
    return argv


def _check(args: TrainArgs, world_size: int) -> None:
    positive = ["epochs", "micro_batch_size", "global_batch_size", "seq_len", "r", "log_every",
                "max_nonfinite_steps", "keep_last"]
    for name in positive:
        value = getattr(args, name)
        if value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0 <= args.fast_adapter_rank <= args.r:
        raise ConfigError(f"--fast-adapter-rank must be between 0 and --r {args.r}, got {args.fast_adapter_rank}")
    if not 0.0 <= args.fast_adapter_angle <= 90.0:
        raise ConfigError(f"--fast-adapter-angle must be between 0 and 90 degrees, got {args.fast_adapter_angle}")
    for name in ("warmup_steps", "save_every", "eval_every", "weight_decay", "max_grad_norm", "calibration_batches"):
        if (getattr(args, name) or 0) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise ConfigError(f"--max-steps must be positive, got {args.max_steps}")
    if args.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    if not 0.0 < args.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.resume not in ("auto", "never") and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume: {args.resume} is neither auto, never nor a checkpoint directory")
    if args.dataset is not None and not Path(args.dataset).exists():
        raise ConfigError(f"--dataset: {args.dataset} not found")
    if args.output_dir is None and args.resume == "auto":
        raise ConfigError("--resume auto continues the run in --output-dir: pass --output-dir DIR (without it, "
                          "every run starts in a new folder)")
    if args.config is not None and args.fsdp:
        raise ConfigError("--config (DeepSpeed) and --fsdp choose two different engines; pass one")
    if args.config is not None:
        read_ds_config(args.config)  # a missing or unparsable file fails now; "auto" is filled by the engine
    per_pass = args.micro_batch_size * world_size
    if args.global_batch_size % per_pass:
        raise ConfigError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x {world_size} process(es) = {per_pass}"
        )


# Best peak rates measured on SmolLM2-135M-Instruct (BENCHMARKS.md section 8). With a random A (k = 0):
RANDOM_A_LR = 2e-3
# With every row calibrated (k = r), by angle: the exact directions (0) all point where the loss falls, so each
# step moves the output further and they want a lower rate; the more a row is turned toward a random one, the
# closer its rate comes to (and, whitened, passes) a random A's.
BEST_LR_BY_ANGLE = ((0.0, 5e-4), (65.0, 2e-3), (80.0, 5e-3))


def default_lr(fast_adapter_rank: int, r: int, angle: float) -> float:
    """The peak learning rate: RANDOM_A_LR with k = 0; with k = r, BEST_LR_BY_ANGLE, log-linear between the
    measured angles and held beyond the last; log-linear in k between the two (2e-3 x 4^(-k/r) at angle 0)."""
    pairs = list(zip(BEST_LR_BY_ANGLE, BEST_LR_BY_ANGLE[1:], strict=False))
    (a0, lr0), (a1, lr1) = next((pair for pair in pairs if angle <= pair[1][0]), pairs[-1])
    every_row = lr0 * (lr1 / lr0) ** min((angle - a0) / (a1 - a0), 1.0)
    share = min(max(fast_adapter_rank, 0), r) / r
    return RANDOM_A_LR * (every_row / RANDOM_A_LR) ** share


def default_warmup(total_steps: int) -> int:
    """A tenth of the run's optimizer steps, rounded up: the benchmark that chose the default learning rate
    warmed up 2 of 16 steps; without it the quick start's loss jumped at step 2 (README)."""
    return math.ceil(total_steps / 10)


def parse_args(argv: list[str] | None = None, world_size: int | None = None,
               prog: str = "lorafa-scale train") -> TrainArgs:
    """Parse and check the options; world_size defaults to $WORLD_SIZE (set by every launcher)."""
    parser = build_parser(prog)
    argv = list(argv or [])
    recipe = _find_recipe(argv)
    if recipe is not None:
        checker = build_parser()
        checker.exit_on_error = False
        argv = _recipe_argv(recipe, checker) + argv
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [s for a in parser._actions for s in a.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown option {unknown[0]}{hint} (see --help)")
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if namespace.output_dir is None and os.environ.get(ENV_OUTPUT_DIR):
        namespace.output_dir = os.environ[ENV_OUTPUT_DIR]
    if namespace.global_batch_size is None:
        namespace.global_batch_size = namespace.micro_batch_size * world_size
    if namespace.fast_adapter_rank is None:
        namespace.fast_adapter_rank = namespace.r
    if namespace.lr is None and isinstance(namespace.fast_adapter_rank, int) and namespace.r > 0:
        namespace.lr = default_lr(namespace.fast_adapter_rank, namespace.r, namespace.fast_adapter_angle)
    args = TrainArgs(**vars(namespace))
    _check(args, world_size)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    args.grad_accum = args.global_batch_size // (args.micro_batch_size * world_size)
    return args


def check_options(argv: list[str]) -> argparse.Namespace:
    """The options as the trainer will parse them, without looking at files or the world size (for
    `lorafa-scale launch`, whose trainer runs elsewhere): an unknown option or a bad value is a ConfigError."""
    parser = build_parser("launch/train.py")
    parser.exit_on_error, parser.raise_errors = False, True
    try:
        namespace, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(str(err)) from None
    if unknown:
        raise ConfigError(parser.unknown_message(unknown[0]))
    return namespace


def _find_recipe(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--recipe="):
            return token.split("=", 1)[1]
    return None
