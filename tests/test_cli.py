"""The `lorafa-scale` command: one vocabulary, one-line errors with a "did you mean", defaults in --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorafa_scale import __version__, cli


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_unknown_commands(capsys):
    assert run_cli(capsys, "--version") == (0, f"lorafa-scale {__version__}\n", "")
    code, out, err = run_cli(capsys, "trian")
    assert code == 2 and out == "" and err == "lorafa-scale: error: unknown command 'trian'; did you mean 'train'? (see lorafa-scale --help)\n"
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(name in out for name in ("train", "launch", "plan", "merge", "generate", "--version"))


@pytest.mark.parametrize("command, typo, suggestion", [
    ("train", "--micro-bach-size", "--micro-batch-size"),
    ("launch", "--global-bach-size", "--global-batch-size"),
    ("plan", "--quantisation", "--quantization"),
    ("merge", "--dtipe", "--dtype"),
    ("generate", "--max-new-token", "--max-new-tokens"),
])
def test_every_subcommand_answers_an_unknown_option_in_one_line(capsys, command, typo, suggestion):
    code, out, err = run_cli(capsys, command, typo, "1")
    assert code == 2 and out == "", out
    assert err.count("\n") == 1 and f"unknown option {typo}; did you mean {suggestion}?" in err, err
    assert err.startswith(f"lorafa-scale {command}: error: ")


@pytest.mark.parametrize("command, shown", [
    ("train", ["--micro-batch-size MICRO_BATCH_SIZE", "(default: 4)", "(default: all-linear)"]),
    ("launch", ["--global-batch-size GLOBAL_BATCH", "--micro-batch-size MICRO_BATCH", "--config", "(default: 24:00:00)"]),
    ("plan", ["--micro-batch-size", "--quantization", "--target-modules", "(default: bfloat16)", "(default: 8)"]),
    ("merge", ["--quantization", "(default: bfloat16)"]),
    ("generate", ["--max-new-tokens", "(default: 64)", "--no-adapter"]),
])
def test_help_shows_the_shared_names_and_the_defaults(capsys, command, shown):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert all(" ".join(s.split()) in flat for s in shown), out
    for old in ("--micro-batch ", "--global-batch ", "--quant ", "--targets", "--deepspeed-config", "--strategy deepspeed"):
        assert old not in flat  # deprecated spellings still work but are not advertised


def test_trainer_names_itself_by_the_command_typed(tmp_path):
    script = subprocess.run([sys.executable, "launch/train.py", "--epoch", "2"], capture_output=True, text=True,
                            cwd=cli.__file__.rsplit("/lorafa_scale/", 1)[0])
    assert script.returncode == 2
    assert script.stderr.splitlines()[-1] == "launch/train.py: error: unknown option --epoch; did you mean --epochs? (see --help)"


def test_third_party_noise_is_filtered_and_other_warnings_stay():
    import logging
    import warnings

    from lorafa_scale.cli_args import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party(deepspeed=False, quantized=False)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                      "`torch.distributed.reduce_scatter_single` instead.", FutureWarning, stacklevel=1)
        warnings.warn("something that matters", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something that matters"]
    ds = logging.getLogger("DeepSpeed")
    record = ds.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, "Setting accelerator to CPU. If you have "
                           "GPU or other accelerator, we were unable to detect it.", None, None)
    assert not ds.filter(record)
    assert ds.filter(ds.makeRecord("DeepSpeed", logging.WARNING, __file__, 1, "a real problem", None, None))
