"""What every `lorafa-scale` subcommand's option parser shares: one-line errors with a "did you mean",
defaults shown in --help, and the old spellings of renamed options, accepted for one release with a note.

The names are the training job's (launch/train.py), which users type most: --micro-batch-size,
--global-batch-size, --quantization, --target-modules a b, --dtype float32|bfloat16|float16, --config FILE
(DeepSpeed) / --fsdp, --model.
"""

from __future__ import annotations

import argparse
import difflib
import sys

# Old dtype names (planner, merge) -> the training job's.
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def deprecated(prog: str, old: str, new: str) -> None:
    print(f"{prog}: note: {old} is deprecated, use {new} (still accepted in this release)", file=sys.stderr)


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to each option that has a default worth showing and does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".strip()


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter that prints the description as written (a module docstring with its examples)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: what; did you mean --x?`, never the usage block."""

    raise_errors = False  # True: errors raise ConfigError instead of exiting (to check options for another tool)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def known_options(self) -> list[str]:
        return [s for a in self._actions for s in a.option_strings if a.help is not argparse.SUPPRESS]

    def unknown_message(self, token: str) -> str:
        option = token.split("=")[0]
        if not option.startswith("-"):
            return f"unexpected argument {token!r} (see --help)"
        close = difflib.get_close_matches(option, self.known_options(), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"unknown option {option}{hint} (see --help)"

    def parse_args(self, args=None, namespace=None):
        if not self.exit_on_error:  # the caller handles argparse.ArgumentError itself
            return super().parse_args(args, namespace)
        args = list(sys.argv[1:] if args is None else args)
        raise_errors, self.raise_errors = self.raise_errors, True
        try:
            namespace, unknown = self.parse_known_args(args, namespace)
        except Exception as err:  # e.g. "arguments are required" because a typo swallowed a positional
            self.raise_errors = raise_errors
            known = set(self.known_options()) | {s for a in self._actions for s in a.option_strings}
            typo = next((t for t in args if t.startswith("--") and t.split("=")[0] not in known and t != "--"), None)
            self.error(self.unknown_message(typo) if typo else str(err))
        finally:
            self.raise_errors = raise_errors
        if unknown:
            self.error(self.unknown_message(unknown[0]))
        return namespace

    def error(self, message):
        if self.raise_errors:
            from .config import ConfigError

            raise ConfigError(message)
        self.exit(2, f"{self.prog}: error: {message}\n")


class Renamed(argparse.Action):
    """An old option name that stores into the new option's dest, with a one-line deprecation note.

    `convert` turns the old value into the new one (e.g. "q_proj,v_proj" -> ["q_proj", "v_proj"])."""

    def __init__(self, option_strings, dest, new: str, convert=None, **kwargs):
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.convert = new, convert

    def __call__(self, parser, namespace, values, option_string=None):
        deprecated(parser.prog, option_string, self.new)
        setattr(namespace, self.dest, self.convert(values) if self.convert else values)


def add_renamed(parser: argparse.ArgumentParser, old: str, new: str, *, convert=None, note: str | None = None,
                **kwargs) -> None:
    """Accept `old` as a deprecated spelling of the already-added option `new` (`note`: what to use instead)."""
    dest = next(a.dest for a in parser._actions if new in a.option_strings)
    parser.add_argument(old, action=Renamed, dest=dest, new=note or new, convert=convert, default=argparse.SUPPRESS,
                        **kwargs)


def dtype_type(prog: str):
    """An argparse type for --dtype that takes the training job's names and, with a note, the old short ones."""

    def convert(value: str) -> str:
        if value in DTYPE_ALIASES:
            deprecated(prog, f"--dtype {value}", f"--dtype {DTYPE_ALIASES[value]}")
            return DTYPE_ALIASES[value]
        return value

    return convert


def comma_list(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def _not_accelerator_choice(record) -> bool:
    return "Setting accelerator to" not in record.getMessage()


def _not_cpu_kernel_hint(record) -> bool:
    return "gemm_4bit_forward" not in record.getMessage()


def quiet_third_party(*, deepspeed: bool, quantized: bool) -> None:
    """Keep library noise that says nothing about this run out of a command's output (warnings that matter stay).

    - torch renamed some collectives; DeepSpeed still calls the old names, whose FutureWarning landed inside
      the progress bar of sharded runs. Only those renames are silenced.
    - transformers' save_pretrained imports DeepSpeed through accelerate whenever it is installed, and
      DeepSpeed then logs which accelerator it picked ("Setting accelerator to CPU ... unable to detect
      it"). That matters only to runs on the DeepSpeed engine (deepspeed=True), which keep it.
    - PEFT imports bitsandbytes, which on some CPUs suggests installing `kernels` for its 4-bit inference
      kernel: news only to a run with a quantized base (quantized=True), which keeps it.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.(reduce_scatter_tensor|"
                            r"_reduce_scatter_base|all_gather_into_tensor|_all_gather_base)` is")
    if not deepspeed:
        logging.getLogger("DeepSpeed").addFilter(_not_accelerator_choice)
    if not quantized:
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_cpu_kernel_hint)
