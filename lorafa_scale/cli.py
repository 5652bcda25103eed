"""The `lorafa-scale` command. Each subcommand lives in its own module and is imported only when used."""

from __future__ import annotations

import difflib
import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
SUBCOMMANDS = {
    "train": ("lorafa_scale.training.loop", "main", "train LoRA-FA adapters (no options: a 1-minute built-in CPU job)"),
    "launch": ("lorafa_scale.jobs.launcher", "main", "write the Slurm job for a multi-node run of a preset"),
    "plan": ("lorafa_scale.jobs.planner", "main", "per-GPU memory of a fine-tuning job, before renting GPUs"),
    "merge": ("lorafa_scale.merge", "main", "base + adapter as a full-precision model, one tensor in RAM at a time"),
    "generate": ("lorafa_scale.generate", "main", "complete a prompt or chat message with a base model + adapter"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"lorafa-scale {__version__}")
        return 0
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        close = difflib.get_close_matches(argv[0], SUBCOMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        what = "option" if argv[0].startswith("-") else "command"
        print(f"lorafa-scale: error: unknown {what} '{argv[0]}'{hint} (see lorafa-scale --help)", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:<9} {helptext}" for name, (_, _, helptext) in SUBCOMMANDS.items()]
        print("usage: lorafa-scale {" + ",".join(SUBCOMMANDS) + "} [options]\n       lorafa-scale --version\n\n"
              + "\n".join(lines) + "\n\nlorafa-scale COMMAND --help shows a command's options and their defaults.")
        return 0
    module, function, _ = SUBCOMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
