"""The training job behind launch/train.py and `lorafa-scale train`.

Order of work: every check that can fail on bad input (options, output dir, checkpoint to resume, dataset)
runs before the model is loaded. Then the loop runs optimizer steps through a Strategy (strategy.py), so
the same loop drives one process, DeepSpeed or FSDP2.

The loss of a step is the mean over every trained token of the global batch, whatever the split into
micro-batches and processes: each micro-batch contributes its summed token loss divided by the step's
token count (all-reduced first). Per-step losses, the adapter and the checkpoints therefore do not depend
on --micro-batch-size, and a resumed run repeats an uninterrupted one exactly (see data.BatchSchedule).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..cli_args import quiet_third_party
from ..config import ConfigError, LoraFAConfig
from ..engines.strategy import CLIENT_STATE_NAME, Strategy, make_strategy, read_client_state, strategy_name
from ..fast_adapter import calibrate
from ..lean import is_lean
from ..model import get_peft_model
from ..peft_format import AdapterFormatError
from . import embedded, rundir
from .args import TrainArgs, default_warmup, parse_args
from .checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointError,
    check_resumable,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .data import IGNORE_INDEX, BatchSchedule, DataError, collate, load_dataset, trained_tokens
from .metrics import METRICS_NAME, PLOT_NAME, MetricsLog, check_tracker

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: "try again later"; a Slurm script requeues on it
EXIT_DIVERGED = 3  # too many consecutive non-finite losses
RUN_CONFIG_NAME = "run_config.json"
ADAPTER_DIR = "adapter"
EMBEDDED_BASE_DIR = "base_model"
RUN_FILES = (RUN_CONFIG_NAME, METRICS_NAME, PLOT_NAME, ADAPTER_DIR, CHECKPOINTS_DIR)
# Options a checkpoint must agree with: they decide which examples each step sees and the adapter's shape.
RESUME_FIXED = ("model", "global_batch_size", "seq_len", "packing", "seed", "val_fraction", "eval_every",
                "r", "lora_alpha", "target_modules")
USER_ERRORS = (ConfigError, DataError, CheckpointError, AdapterFormatError)


class StopSignals:
    """Within the block, SIGTERM and SIGUSR1 only set `received`; the loop stops after its current step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, _frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# -- before the model ------------------------------------------------------------------------------------
def resume_point(args: TrainArgs, world_size: int) -> Path | None:
    """The checkpoint to resume from, or None; refuse an output dir that holds another run."""
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output-dir {output} is a file")
    held = [name for name in RUN_FILES if (output / name).exists()]
    if args.overwrite and args.resume != "never":
        raise ConfigError("--overwrite starts afresh and --resume continues; pass one of them")
    if args.resume == "never":
        if held and not args.overwrite:
            raise ConfigError(f"--output-dir {output} holds another run ({', '.join(held)}); pass --resume auto "
                              "to continue it or --overwrite to replace it")
        return None
    checkpoint = latest_checkpoint(output) if args.resume == "auto" else Path(args.resume)
    if checkpoint is None:
        return None
    check_resumable(checkpoint, world_size)
    if not (checkpoint / CLIENT_STATE_NAME).is_file():
        raise CheckpointError(f"{checkpoint}: no {CLIENT_STATE_NAME}; not a lorafa-scale checkpoint")
    saved = read_client_state(checkpoint).get("args", {})
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != getattr(args, k)]
    if changed:
        details = ", ".join(f"--{k.replace('_', '-')} {saved[k]} -> {getattr(args, k)}" for k in changed)
        raise CheckpointError(f"{checkpoint}: cannot resume with different options ({details})")
    return checkpoint


def ensure_embedded_base(output_dir) -> None:
    """Write the built-in model and tokenizer to <output-dir>/base_model unless it is there.

    Its weights do not depend on --seed, so every rank (and every later run) builds the same model; each
    rank writes to its own temporary dir and renames it into place, so concurrent ranks never clash.
    """
    target = Path(output_dir) / EMBEDDED_BASE_DIR
    if not target.is_dir():
        tmp = target.with_name(f".{EMBEDDED_BASE_DIR}.{os.getpid()}.tmp")
        tokenizer = embedded.build_tokenizer()
        embedded.build_model(tokenizer, seed=0, dtype=torch.float32).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another rank got there first with the same files
            shutil.rmtree(tmp)


def load_tokenizer(args: TrainArgs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"--model {args.model}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- the model -------------------------------------------------------------------------------------------
def build_model(args: TrainArgs, strategy: Strategy):
    """The base model from args.model with LoRA-FA injected, built in the strategy's init context."""
    from transformers import AutoModelForCausalLM

    from ..quantization import bnb_config, default_device_map, upcast_trainable_

    dtype = getattr(torch, args.dtype)
    lora_config = LoraFAConfig(
        r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules,
        fast_adapter_rank=args.fast_adapter_rank, task_type="CAUSAL_LM",
    )
    kwargs = dict(dtype=dtype, trust_remote_code=args.trust_remote_code)
    quantization = bnb_config(args.quantization, dtype)
    if quantization is not None:  # zero.Init cannot build quantized layers: each rank loads, the engine shards
        kwargs.update(quantization_config=quantization, device_map=default_device_map())
    torch.manual_seed(args.seed)  # the adapter's A
    with strategy.model_init_context() if quantization is None else nullcontext():
        base = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
        if args.gradient_checkpointing:  # non-reentrant: restores the RNG, so dropout masks repeat
            if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.x
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
        model = get_peft_model(base, lora_config, lean=args.lean)
    return upcast_trainable_(model)


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warmup to the peak, then cosine decay towards zero at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def token_loss_sum(module, batch: dict, device) -> torch.Tensor:
    """Summed next-token cross-entropy over the trained tokens of a micro-batch (fp32)."""
    if is_lean(module):  # the model's own lean head + loss: a sum with num_items_in_batch=1, no logits
        # collate right-pads and ignores the padding's labels, so the causal mask alone gives the real tokens
        # the same outputs; without a padding mask SDPA keeps no batch x seq x seq float mask for backward
        mask = batch["attention_mask"]
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
        return module(input_ids=batch["input_ids"].to(device),
                      attention_mask=None if right_padded else mask.to(device),
                      labels=batch["labels"].to(device), num_items_in_batch=1).loss
    logits = module(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"][:, 1:].to(device)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def calibrate_fast_rows(module, strategy: Strategy, schedule: BatchSchedule, batches: int, angle: float) -> None:
    """Collective: set the fast rows of A from the first `batches` training steps' micro-batches."""
    micro_batches = [b for step in range(batches) for b in schedule.micro_batches(step, strategy.rank,
                                                                                 strategy.world_size)]
    report = calibrate(module, micro_batches, loss_fn=lambda m, b: token_loss_sum(m, b, strategy.device),
                       angle=angle, progress=strategy.is_main())
    if strategy.is_main():
        print(f"lorafa-scale: calibrated {report.fast_rows} fast rows of A in {report.layers} layers on {batches} "
              f"training batches ({report.batches} micro-batches, {report.tokens:,d} tokens{report.turned}) in "
              f"{report.seconds:.1f} s", flush=True)


def forward_backward(module, strategy: Strategy, micro_batches, stop_requested: bool) -> tuple[float, int, bool]:
    """Collective: the forward and backward passes of one optimizer step on every rank.

    Returns the step's mean token loss over all ranks (nan if any rank's loss was not finite), the number
    of input tokens over all ranks, and whether any rank asked to stop.
    """
    counts = torch.tensor([sum(trained_tokens(b) for b in micro_batches),
                           sum(int(b["attention_mask"].sum()) for b in micro_batches)], dtype=torch.float64)
    step_tokens, step_inputs = strategy.all_reduce_sum(counts).tolist()
    scale = strategy.grad_accum * strategy.world_size / step_tokens  # see the module docstring
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in micro_batches:
        loss = token_loss_sum(module, batch, strategy.device)
        strategy.backward(loss * scale)
        loss_sum += loss.detach().double().cpu()
    finite = bool(torch.isfinite(loss_sum))
    flags = torch.tensor([float(loss_sum) if finite else 0.0, float(not finite), float(stop_requested)],
                         dtype=torch.float64)
    total, nonfinite, stop = strategy.all_reduce_sum(flags).tolist()
    return (float("nan") if nonfinite else total / step_tokens), int(step_inputs), bool(stop)


@torch.no_grad()
def evaluate(module, strategy: Strategy, examples, micro_batch_size: int, pad_id: int) -> float:
    """Mean token loss over the validation examples, shared out over ranks.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in forward): a
    rank with nothing left runs a dummy example that it does not count.
    """
    module.eval()
    per_pass = micro_batch_size * strategy.world_size
    totals = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(examples), per_pass):
        mine = examples[start + strategy.rank * micro_batch_size : start + (strategy.rank + 1) * micro_batch_size]
        batch = collate(mine or examples[:1], pad_id)
        loss = token_loss_sum(module, batch, strategy.device)
        if mine:
            totals += torch.tensor([float(loss), trained_tokens(batch)], dtype=torch.float64)
    module.train()
    totals = strategy.all_reduce_sum(totals)
    return float(totals[0] / totals[1])


def _memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS"


def _share_cpu_threads(embedded_job: bool) -> None:
    """Choose the CPU thread count when the user has not (OMP_NUM_THREADS unset).

    The built-in model's 128-wide matrices are too small to split across threads: one thread is faster,
    and never stalls spinning on a busy machine (the built-in job on this 2-core machine under load: 14 s
    with one thread, 142 s with two). Otherwise each local process gets its share of the cores: the
    deepspeed launcher, unlike torchrun, leaves every rank on every core.
    """
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    torch.set_num_threads(1 if embedded_job else max(1, (os.cpu_count() or 1) // local_processes))


def _quiet_third_party(args: TrainArgs) -> None:
    """Third-party noise out of a normal run (cli_args.quiet_third_party says what and why)."""
    quiet_third_party(deepspeed=strategy_name(args) == "deepspeed", quantized=args.quantization != "none")


def _quiet_unless_main() -> None:
    """Ranks other than 0 print only errors: no transformers progress bars or warnings from each of them."""
    if int(os.environ.get("RANK", 0)) != 0:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()


# -- the job ---------------------------------------------------------------------------------------------
def train(args: TrainArgs) -> int:
    """Run the job; return the process exit code (0, EXIT_PREEMPTED or EXIT_DIVERGED)."""
    embedded_job = args.embedded
    _share_cpu_threads(embedded_job)
    _quiet_third_party(args)
    _quiet_unless_main()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.output_dir is None:  # a new folder for this run; every rank of the launch finds the same one
        args.output_dir = str(rundir.new_run_dir(world_size))
    if embedded_job:
        args.model = str(Path(args.output_dir) / EMBEDDED_BASE_DIR)
    checkpoint = resume_point(args, world_size)
    check_tracker(args.report_to)
    if embedded_job:
        ensure_embedded_base(args.output_dir)
    strategy = make_strategy(args)
    main = strategy.is_main()
    output = Path(args.output_dir)
    if main and args.overwrite:
        for name in RUN_FILES:
            path = output / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    strategy.barrier()

    tokenizer = load_tokenizer(args)
    dataset = args.dataset or embedded.sample_dataset_path()
    data = load_dataset(dataset, tokenizer, args.seq_len, args.packing,
                        args.val_fraction if args.eval_every else 0.0, args.seed)
    if args.eval_every and not data.validation:
        raise DataError(f"--eval-every {args.eval_every}: {dataset} leaves no validation example")
    schedule = BatchSchedule(data.train, args.global_batch_size, args.micro_batch_size, args.seed,
                             tokenizer.pad_token_id)
    total_steps = args.max_steps or args.epochs * schedule.steps_per_epoch

    model = build_model(args, strategy)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = strategy.make_optimizer(trainable_params, args.lr, args.weight_decay)
    warmup = default_warmup(total_steps) if args.warmup_steps is None else args.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
    module = strategy.setup(model, optimizer, scheduler)
    module.train()

    state = {"step": 0, "skipped_steps": 0, "nonfinite_in_a_row": 0}
    if checkpoint is not None:
        state.update({k: v for k, v in load_checkpoint(strategy, checkpoint).items() if k in state})
        model.fast_rows_calibrated = True  # A (calibrated or not) comes from the checkpoint: never recalibrate
    if main:
        output.mkdir(parents=True, exist_ok=True)
        (output / RUN_CONFIG_NAME).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    metrics = MetricsLog(output, main, state["step"], args.report_to, args.to_dict())

    trainable, total = model.get_nb_trainable_parameters()
    if main:
        print(f"lorafa-scale: run in {output} | {args.model} | {total / 1e6:.2f}M params, {trainable:,} trainable "
              f"({100 * trainable / total:.3f}%) | {strategy.name}, {strategy.world_size} process(es) | "
              f"micro {args.micro_batch_size} x accum {args.grad_accum} x {strategy.world_size} = global "
              f"{args.global_batch_size} | {data.summary(args.seq_len)} | lr {args.lr:g}, warmup {warmup} | "
              f"steps {state['step']}->{total_steps}"
              + (f" (resumed from {checkpoint})" if checkpoint else "") + f" | memory {_memory()}", flush=True)
    if checkpoint is None:
        if args.fast_adapter_rank and args.calibration_batches:
            calibrate_fast_rows(module, strategy, schedule, args.calibration_batches, args.fast_adapter_angle)
        torch.manual_seed(args.seed * 1000 + strategy.rank)  # dropout; restored from checkpoints on resume

    def checkpoint_now():
        client_state = dict(state, epoch=schedule.epoch_of(state["step"]), args=args.to_dict())
        return save_checkpoint(strategy, output, state["step"], client_state, args.keep_last)

    progress = tqdm(total=total_steps, initial=state["step"], disable=not main, desc="train", unit="step",
                    dynamic_ncols=True)
    exit_code = 0
    with StopSignals() as signals:
        while state["step"] < total_steps:
            started = time.perf_counter()
            micro_batches = schedule.micro_batches(state["step"], strategy.rank, strategy.world_size)
            loss_value, step_inputs, stop = forward_backward(module, strategy, micro_batches,
                                                             signals.received is not None)
            nonfinite = not math.isfinite(loss_value)
            lr = optimizer.param_groups[0]["lr"]
            if nonfinite:
                strategy.skip_step()
                grad_norm = float("nan")
                state["skipped_steps"] += 1
                state["nonfinite_in_a_row"] += 1
            else:
                grad_norm = strategy.step()
                state["nonfinite_in_a_row"] = 0
            state["step"] += 1
            step = state["step"]
            tokens_per_s = step_inputs / (time.perf_counter() - started)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:.0f}")
            if step % args.log_every == 0 or step == total_steps:
                record = {"step": step, "epoch": schedule.epoch_of(step - 1), "loss": loss_value, "lr": lr,
                          "tokens_per_s": tokens_per_s, "grad_norm": grad_norm, "skipped": nonfinite}
                metrics.log({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                             for k, v in record.items()})
            if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
                eval_loss = evaluate(module, strategy, data.validation, args.micro_batch_size,
                                     tokenizer.pad_token_id)
                metrics.log({"step": step, "eval_loss": eval_loss})
                if main:
                    progress.write(f"step {step}: validation loss {eval_loss:.4f}")
            diverged = state["nonfinite_in_a_row"] >= args.max_nonfinite_steps
            if diverged or stop:
                path = checkpoint_now()
                if diverged:
                    exit_code = EXIT_DIVERGED
                    message = (f"stopped at step {step}: {state['nonfinite_in_a_row']} steps in a row had a "
                               f"non-finite loss (lower --lr, or check the data); last good state saved to {path}")
                else:
                    exit_code = EXIT_PREEMPTED
                    message = (f"stop signal received; checkpoint at step {step} saved to {path}; exiting with "
                               f"code {EXIT_PREEMPTED} (continue with --resume auto --output-dir {output})")
                if main:
                    print(f"lorafa-scale: {message}", file=sys.stderr)
                break
            if args.save_every and step % args.save_every == 0:
                checkpoint_now()
    progress.close()
    if exit_code == 0:
        checkpoint_now()
        strategy.save_adapter(output / ADAPTER_DIR)
    metrics.plot()
    metrics.close()
    if main and exit_code == 0:
        print(f"lorafa-scale: done, {state['step']} steps ({state['skipped_steps']} skipped) | adapter (PEFT format): "
              f"{output / ADAPTER_DIR} | {output / METRICS_NAME} | {output / PLOT_NAME} | memory {_memory()}")
    if torch.distributed.is_initialized():
        # Left to interpreter shutdown, the process group's threads sometimes aborted a rank (SIGABRT,
        # "terminate called without an active exception") after a finished run, turning exit 0 or 75 into a crash.
        strategy.barrier()
        torch.distributed.destroy_process_group()
    return exit_code


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point: parse options, run, turn bad input into a one-line error (exit code 2).

    Errors name the command the user typed: `lorafa-scale train` (argv given, as the CLI does) or the
    script itself (`launch/train.py`, when started as `python launch/train.py` or by a launcher)."""
    if prog is None:
        prog = sys.argv[0] if argv is None else "lorafa-scale train"
    args = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, prog=prog)
        new_dir = args.output_dir is None
        try:
            return train(args)
        except USER_ERRORS:
            # a refused run leaves no empty new folder behind (one process: no other rank may still use it)
            if new_dir and args.output_dir and int(os.environ.get("WORLD_SIZE", 1)) == 1 \
                    and rundir.is_unused(Path(args.output_dir)):
                shutil.rmtree(args.output_dir, ignore_errors=True)
            raise
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
