"""The `lorafa-scale` command. Each subcommand lives in its own module and is imported only when used."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
SUBCOMMANDS = {
    "train": ("lorafa_scale.training.loop", "main", "train LoRA-FA adapters (no options: a 1-minute built-in CPU job)"),
    "launch": ("lorafa_scale.jobs.launcher", "main", "write the Slurm job for a multi-node run of a preset"),
    "plan": ("lorafa_scale.jobs.planner", "main", "per-GPU memory of a fine-tuning job, before renting GPUs"),
    "merge": ("lorafa_scale.merge", "main", "base + adapter as a full-precision model, one tensor in RAM at a time"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<8} {helptext}" for name, (_, _, helptext) in SUBCOMMANDS.items()]
        print("usage: lorafa-scale {" + ",".join(SUBCOMMANDS) + "} [options]\n\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nlorafa-scale: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    module, function, _ = SUBCOMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
