"""Fast adaptation on a real pretrained model: ours (LoRA-FA, k calibrated rows of A) against PEFT's LoRA inits.

    python bench/adaptation.py --tasks dates labels --seeds 0 1 2 --lrs 2e-4 5e-4 1e-3 2e-3 5e-3

SmolLM2-135M-Instruct (bench/smollm2.py, fp32), r 16, lora_alpha 32, all linear layers, no dropout, AdamW
(weight decay 0), linear warmup then cosine decay as launch/train.py, batch 8, the same training batches in
the same order for every method at a given seed. Held-out loss (answer tokens only, 64 held-out examples)
every --eval-every steps; greedy exact-match accuracy on the held-out prompts at the end. Each method's best
learning rate is the grid value with the lowest final held-out loss averaged over the seeds. Seeds added
later can skip, with --prune, the rates that earlier seeds put far from a method's best (successive halving).
Each run records its settings (steps, warmup, eval_every, max_grad_norm, calib_batches, screen): --resume,
--prune and --summarize refuse to mix runs made under different ones, a training run adds to an existing
--out only with --resume, and --summarize writes an existing --out only when it is one of its inputs.
--screen runs one of bench/adaptation_screens.py's changes to the package's internals.

Methods: peft-lora (PEFT default init), peft-lora-ga (init_lora_weights="lora_ga"), peft-eva (EVA),
peft-lorafa (PEFT's create_lorafa_optimizer), ours-k0 / ours-k4 / ours-k16 (fast_adapter_rank k, calibrated
by lorafa_scale.calibrate on the first --calib-batches training batches, the exact directions: angle 0),
ours-k<k>-a<degrees> (the rows turned by that angle; ours-k16-a80 is the trainer's default), and the ablation ours-k<k>-gradient
(calibrate(..., whiten=0): unit rows along the raw gradient's singular vectors, LoRA-GA's directions;
ours-k<k>-gradient-a<degrees> turns them) and ours-k<k>-w<p>[-a<degrees>] (partly whitened, whiten=p). Results: bench/results/adaptation.json and
bench/results/adaptation.png (held-out loss curves at each method's best rate).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from adaptation_screens import SCREENS
from adaptation_tasks import make_split
from smollm2 import smollm2_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorafa_scale
from lorafa_scale.jobs.planner import measure_kept
from lorafa_scale.training.args import RANDOM_A_LR, default_lr

RESULTS = Path(__file__).resolve().parent / "results"
R, ALPHA, BATCH, HELDOUT = 16, 32, 8, 64
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # = "all-linear"
METHODS = ["peft-lora", "peft-lora-ga", "peft-eva", "peft-lorafa", "ours-k0", "ours-k4", "ours-k16"]
# what a run's result depends on besides (task, method, lr, seed): written into each run, so that runs made
# under different settings are never resumed into, pruned from or merged with one another by accident
SETTINGS = ("steps", "warmup", "eval_every", "max_grad_norm", "calib_batches", "screen")
UNSCREENED = {"screen": "none"}  # what runs recorded before --screen existed ran


# -- data --------------------------------------------------------------------------------------------------
def encode(examples, tokenizer) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels; labels are -100 outside the answer."""
    rows = []
    for ex in examples:
        prompt = tokenizer(f"Q: {ex.prompt}\nA:").input_ids
        answer = tokenizer(f" {ex.answer}").input_ids + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
    }


def task_data(task: str, steps: int, seed: int, tokenizer):
    heldout = make_split(task, HELDOUT, seed=10_000)
    train = make_split(task, steps * BATCH, seed=seed, exclude={ex.prompt for ex in heldout})
    batches = [encode(train[i:i + BATCH], tokenizer) for i in range(0, len(train), BATCH)]
    return batches, heldout, encode(heldout, tokenizer)


# -- evaluation --------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, heldout_batch) -> float:
    model.eval()
    loss = float(model(**heldout_batch).loss)
    model.train()
    return loss


@torch.no_grad()
def exact_match(model, tokenizer, heldout) -> float:
    model.eval()
    tokenizer.padding_side = "left"
    prompts = tokenizer([f"Q: {ex.prompt}\nA:" for ex in heldout], return_tensors="pt", padding=True)
    out = model.generate(**prompts, max_new_tokens=14, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    answers = tokenizer.batch_decode(out[:, prompts["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train()
    return sum(a.strip() == ex.answer for a, ex in zip(answers, heldout, strict=True)) / len(heldout)


# -- methods -----------------------------------------------------------------------------------------------
def peft_config(**extra):
    import peft

    # the names, not "all-linear": PEFT's LoRA-GA preprocessing matches target_modules literally
    return peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=LLAMA_LINEAR,
                           task_type="CAUSAL_LM", **extra)


def ours_variant(method: str) -> tuple[int, float, float]:
    """(k, whiten, angle) of ours-k<k> (the exact calibrated directions), ours-k<k>-a<degrees> (turned by that
    angle), ours-k<k>-gradient (G's own singular vectors as unit rows, whiten 0, the ablation) or
    ours-k<k>-w<power> (partly whitened, D^-power/2); the last two take -a<degrees> too."""
    k, _, variant = method.removeprefix("ours-k").partition("-")
    whiten = 1.0
    if variant.startswith("gradient"):
        whiten, variant = 0.0, variant.removeprefix("gradient").removeprefix("-")
    elif variant.startswith("w"):
        power, _, variant = variant.partition("-")
        whiten = float(power.removeprefix("w"))
    return int(k), whiten, float(variant.removeprefix("a")) if variant else 0.0


def build(method: str, base, batches, calib_batches: int, seed: int, screen: str = "none"):
    """(model, calibration seconds) for `method`, its adapters drawn from `seed` and initialised (B untrained);
    ours under `screen` (bench/adaptation_screens.py)."""
    import peft

    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    calib = batches[:calib_batches]
    start = time.perf_counter()
    if method == "peft-lora-ga":
        config = peft_config(init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig())

        def train_step():
            for batch in calib:
                model(**batch).loss.backward()

        peft.preprocess_loraga(model, config, train_step)
        model = peft.get_peft_model(model, config)
    elif method == "peft-eva":
        config = peft_config(init_lora_weights="eva", eva_config=peft.EvaConfig(rho=1.0))
        model = peft.get_peft_model(model, config)
        peft.initialize_lora_eva_weights(model, calib, show_progress_bar=False)
    elif method.startswith("peft-"):
        model = peft.get_peft_model(model, peft_config())
    else:
        k, whiten, angle = ours_variant(method)
        patch, config_fields = SCREENS[screen]
        config = lorafa_scale.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                         fast_adapter_rank=k, task_type="CAUSAL_LM", **config_fields)
        model = lorafa_scale.get_peft_model(model, config)
        if k:
            with patch():
                lorafa_scale.calibrate(model, calib, whiten=whiten, angle=angle)
    return model, time.perf_counter() - start


def make_optimizer(method: str, model, lr: float):
    if method == "peft-lorafa":
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(model, r=R, lora_alpha=ALPHA, lr=lr)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def kept_bytes(model, batch) -> int:
    """Activation bytes autograd keeps for one training forward (parameters excluded)."""
    model.train()
    return measure_kept(lambda: model(**batch).loss, model)[0]


def train(model, optimizer, batches, heldout_batch, eval_every: int, warmup: int, max_grad_norm: float) -> list[float]:
    """Held-out loss at steps 0, eval_every, 2 eval_every, ... len(batches); gradients clipped to
    max_grad_norm (0: not clipped)."""
    steps = len(batches)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    curve = [heldout_loss(model, heldout_batch)]
    model.train()
    for step, batch in enumerate(batches, start=1):
        loss = model(**batch).loss
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                           max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0:
            curve.append(heldout_loss(model, heldout_batch))
    return curve


# -- main --------------------------------------------------------------------------------------------------
def check_settings(sources: list[tuple[str, list[dict]]], wanted: dict | None = None, ignore: tuple = ()) -> None:
    """Exit with one line naming the field and the two files if runs in `sources` ((file, runs) pairs) were made
    under different SETTINGS, or under other settings than `wanted`. Runs from before settings were recorded
    (no "settings") are let through: their commands in bench/adaptation_log.md and their file names are their
    record."""
    seen = [("this command", wanted)] if wanted is not None else []
    seen += [(name, r["settings"]) for name, runs in sources for r in runs if "settings" in r]
    first_name, first = seen[0] if seen else (None, None)
    for name, found in seen[1:]:
        for field in (field for field in SETTINGS if field not in ignore):
            value, first_value = (settings.get(field, UNSCREENED.get(field)) for settings in (found, first))
            if value != first_value:
                sys.exit(f"bench/adaptation.py: {name} has runs with {field} {value}, but {first_name} "
                         f"has {field} {first_value}: refusing to mix them")


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.screen != UNSCREENED["screen"] and any(not method.startswith("ours-") for method in args.methods):
        sys.exit(f"bench/adaptation.py: --screen {args.screen} changes ours only: give --methods ours-... alone")
    if args.out.exists() and not args.resume:
        sys.exit(f"bench/adaptation.py: {args.out} exists: pass --resume to add runs to it, or name another --out")
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    wanted = {name: getattr(args, name) for name in SETTINGS}
    check_settings([(str(args.out), results["runs"])], wanted)
    done = {(r["task"], r["method"], r["lr"], r["seed"]) for r in results["runs"]}
    if args.prune:  # successive halving: skip the rates already far from a method's best in earlier seeds
        pruning = [(str(path), json.loads(path.read_text())["runs"]) for path in args.prune]
        check_settings(pruning, wanted, ignore=("eval_every",))
        earlier = [r for _, runs in pruning for r in runs]
        done |= {(task, method, lr, seed) for task in args.tasks for method in args.methods
                 for lr in pruned_rates(earlier, task, method, args.prune_factor) for seed in args.seeds}
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base.config.use_cache = False
    for task in args.tasks:
        for seed in args.seeds:
            batches, heldout, heldout_batch = task_data(task, args.steps, seed, tokenizer)
            for method in args.methods:
                initialised = None  # the init does not depend on lr: built once per (method, seed), copied per lr
                for lr in args.lrs:
                    if (task, method, lr, seed) in done:
                        continue
                    if initialised is None:
                        initialised, calib_seconds = build(method, base, batches, args.calib_batches, seed,
                                                           args.screen)
                    model = copy.deepcopy(initialised)
                    optimizer = make_optimizer(method, model, lr)
                    started = time.perf_counter()
                    curve = train(model, optimizer, batches, heldout_batch, args.eval_every, args.warmup,
                                  args.max_grad_norm)
                    record = dict(task=task, method=method, lr=lr, seed=seed, curve=curve, settings=wanted,
                                  calib_seconds=calib_seconds, train_seconds=time.perf_counter() - started)
                    if args.exact_match:
                        record["exact_match"] = exact_match(model, tokenizer, heldout)
                    results["runs"].append(record)
                    print(f"{task} {method:13s} lr {lr:g} seed {seed}: held-out "
                          + " ".join(f"{v:.3f}" for v in curve)
                          + (f" | EM {record['exact_match']:.2f}" if "exact_match" in record else "")
                          + f" | calib {calib_seconds:.1f}s", flush=True)
                    args.out.write_text(json.dumps(results, indent=1))
    if args.memory:
        batch = task_data(args.tasks[0], 1, 0, tokenizer)[0][0]
        results["kept_bytes"] = {}
        for method in args.methods:
            model, _ = build(method, base, [batch], 1, 0)
            make_optimizer(method, model, 1e-4)  # PEFT's LoRA-FA optimizer is what freezes its A
            results["kept_bytes"][method] = kept_bytes(model, batch)
        args.out.write_text(json.dumps(results, indent=1))
    return results


def runs_by_lr(runs: list[dict], task: str, method: str) -> dict[float, list[dict]]:
    by_lr: dict[float, list[dict]] = {}
    for r in runs:
        if r["task"] == task and r["method"] == method:
            by_lr.setdefault(r["lr"], []).append(r)
    return by_lr


def best_runs(runs: list[dict], task: str, method: str) -> tuple[float, list[dict]]:
    """(best lr, its runs): the grid value with the lowest final held-out loss averaged over the seeds."""
    by_lr = runs_by_lr(runs, task, method)
    best = min(by_lr, key=lambda lr: statistics.mean(r["curve"][-1] for r in by_lr[lr]))
    return best, by_lr[best]


def pruned_rates(runs: list[dict], task: str, method: str, factor: float) -> set[float]:
    """The rates whose mean final held-out loss in `runs` is above `factor` x the method's best rate's."""
    means = {lr: statistics.mean(r["curve"][-1] for r in chosen) for lr, chosen in runs_by_lr(runs, task, method).items()}
    return {lr for lr, mean in means.items() if mean > factor * min(means.values())}


def mean_curve(runs: list[dict]) -> list[float]:
    return [statistics.mean(values) for values in zip(*(r["curve"] for r in runs), strict=True)]


def trainer_default_lr(method: str) -> float:
    """launch/train.py's default --lr for ours with fast_adapter_rank k; its random-A default for the others."""
    if method.startswith("ours-k"):
        k, _, angle = ours_variant(method)
        return default_lr(k, R, angle)
    return RANDOM_A_LR


def summarize(results: dict, eval_every: int, reference: list[dict] | None = None) -> str:
    """A markdown table per task: each method at its best lr (mean over seeds), and at the trainer's default lr.
    "steps to PEFT LoRA's final" takes PEFT LoRA's runs from `reference` (default: `results`'); "-" without them."""
    runs, lines = results["runs"], []
    reference = runs if reference is None else reference
    kept = results.get("kept_bytes", {})
    recorded = next((r["settings"] for r in runs if "settings" in r), None)  # one for all: check_settings
    about = f"; warmup {recorded['warmup']}, {recorded['steps']} steps" if recorded else ""
    if recorded and recorded.get("screen", UNSCREENED["screen"]) != UNSCREENED["screen"]:
        about += f", screen {recorded['screen']}"
    for task in sorted({r["task"] for r in runs}):
        methods = [m for m in METHODS + sorted({r["method"] for r in runs} - set(METHODS))
                   if any(r["method"] == m and r["task"] == task for r in runs)]
        has_target = any(r["method"] == "peft-lora" and r["task"] == task for r in reference)
        target = mean_curve(best_runs(reference, task, "peft-lora")[1])[-1] if has_target else None
        lines += [f"\n{task} (held-out loss at steps 0, {eval_every}, {2 * eval_every}, ...; mean of seeds{about})\n",
                  "| method | best lr | seeds | held-out loss curve | final | steps to PEFT LoRA's final | "
                  "exact match | at the trainer's default lr | calibration s | kept for backward MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method in methods:
            best, chosen = best_runs(runs, task, method)
            curve = mean_curve(chosen)
            reached = next((i * eval_every for i, v in enumerate(curve) if target is not None and v <= target), None)
            em = [r["exact_match"] for r in chosen if "exact_match" in r]
            default = trainer_default_lr(method)
            at_default = [r["curve"][-1] for r in runs if r["task"] == task and r["method"] == method
                          and math.isclose(r["lr"], default, rel_tol=1e-6)]
            calib = statistics.mean(r["calib_seconds"] for r in chosen)
            lines.append(
                f"| {method} | {best:g} | {len(chosen)} | " + " ".join(f"{v:.3g}" for v in curve)
                + f" | **{curve[-1]:.4f}** | "
                + (str(reached) if reached is not None else f">{(len(curve) - 1) * eval_every}" if has_target else "-")
                + (f" | {statistics.mean(em):.2f} | " if em else " | - | ")
                + (f"{statistics.mean(at_default):.4f} (lr {default:g})" if at_default else f"- (lr {default:.3g})")
                + f" | {calib:.1f} | " + (f"{kept[method] / 2**20:.1f}" if method in kept else "-") + " |")
    return "\n".join(lines)


def plot(results: dict, eval_every: int, path: Path) -> None:
    """Held-out loss curves, each method at its best lr (mean over seeds), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    tasks = sorted({r["task"] for r in runs})
    columns = min(3, len(tasks))
    rows = -(-len(tasks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks, strict=False):  # the grid may have empty panels at its end
        present = {r["method"] for r in runs if r["task"] == task}
        for method in [m for m in METHODS if m in present] + sorted(present - set(METHODS)):
            best, chosen = best_runs(runs, task, method)
            curve = mean_curve(chosen)
            ax.plot([i * eval_every for i in range(len(curve))], curve, marker="o", ms=3,
                    label=f"{method} (lr {best:g})", lw=2.2 if method.startswith("ours") else 1.2,
                    ls="--" if method not in METHODS else "-")
        ax.set_yscale("log")
        ax.set_title(f"{task}: held-out loss, each method at its best lr")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["dates", "labels"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-4, 5e-4, 1e-3, 2e-3, 5e-3])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-grad-norm", type=float, default=0.0,
                        help="clip gradients to this norm, as launch/train.py (its default 1.0); 0 = no clipping")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--screen", choices=SCREENS, default="none",
                        help="run ours under one of bench/adaptation_screens.py's changes to the package's internals")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exact-match", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--memory", action="store_true", help="also count the bytes kept for backward per method")
    parser.add_argument("--resume", action="store_true", help="skip runs already in --out")
    parser.add_argument("--prune", nargs="+", type=Path, metavar="JSON",
                        help="skip each method's rates whose mean final loss in these earlier results is above "
                             "--prune-factor x its best (to add seeds where they can change the choice)")
    parser.add_argument("--prune-factor", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "adaptation.json")
    parser.add_argument("--summarize", nargs="+", type=Path, metavar="JSON",
                        help="only merge these result files into --out, print the tables and plot")
    parser.add_argument("--reference", nargs="+", type=Path, metavar="JSON",
                        help="take PEFT LoRA's final loss (for 'steps to PEFT LoRA's final') from these result files, "
                             "e.g. for runs at a finer --eval-every that have no PEFT LoRA beside them")
    args = parser.parse_args(argv)

    def asked(runs: list[dict], methods=None) -> list[dict]:  # the grid, seeds and methods asked for
        return [r for r in runs if r["lr"] in args.lrs and r["seed"] in args.seeds
                and (methods is None or r["method"] in methods)]

    references = [(str(path), asked(json.loads(path.read_text())["runs"])) for path in args.reference or []]
    reference = [r for _, runs in references for r in runs] if args.reference else None
    if args.summarize:
        if args.out.exists() and args.out.resolve() not in {path.resolve() for path in args.summarize}:
            sys.exit(f"bench/adaptation.py: --out {args.out} exists and is not a --summarize file: name it among them "
                     "(its runs are kept) or name another --out")
        merged = [json.loads(path.read_text()) for path in args.summarize]
        sources = [(str(path), asked(m["runs"], args.methods)) for path, m in zip(args.summarize, merged, strict=True)]
        for path, m, (_, kept_runs) in zip(args.summarize, merged, sources, strict=True):
            # merging into one of the inputs (a growing results file) must not drop its runs left out of the ask
            if path.resolve() == args.out.resolve() and len(kept_runs) < len(m["runs"]):
                sys.exit(f"bench/adaptation.py: --out {args.out} is a --summarize file and {len(m['runs']) - len(kept_runs)}"
                         " of its runs are outside --methods/--lrs/--seeds: widen them or name another --out")
        check_settings(sources)
        check_settings(sources + references, ignore=("eval_every",))  # a reference may be evaluated more often
        unique = {(r["task"], r["method"], r["lr"], r["seed"]): r for _, runs in reversed(sources) for r in runs}
        results = {"runs": list(unique.values())}  # a run once: the first file given wins
        for m in merged:
            results.setdefault("kept_bytes", {}).update(m.get("kept_bytes", {}))
        args.out.write_text(json.dumps(results, indent=1))
        print(summarize(results, args.eval_every, reference))
        plot(results, args.eval_every, args.out.with_suffix(".png"))
        return 0
    results = run(args)
    print(summarize(results, args.eval_every))
    plot(results, args.eval_every, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
