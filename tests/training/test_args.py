"""Options of the training job: --recipe YAML, derived gradient accumulation, and every bad-input error."""

from __future__ import annotations

import pytest

from lorafa_scale.config import ConfigError
from lorafa_scale.fast_adapter import DEFAULT_ANGLE
from lorafa_scale.training.args import default_lr, parse_args


def test_recipe_supplies_options_and_command_line_wins(tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text("lr: 0.01\nmicro-batch-size: 2\nglobal_batch_size: 8\ntarget_modules: [q_proj, v_proj]\n"
                      "packing: true\n")
    args = parse_args(["--recipe", str(recipe), "--lr", "0.5"], world_size=2)
    assert args.lr == 0.5
    assert args.micro_batch_size == 2
    assert args.target_modules == ["q_proj", "v_proj"]
    assert args.packing is True
    assert args.grad_accum == 8 // (2 * 2)
    assert parse_args(["--recipe", str(recipe), "--no-packing"], world_size=1).packing is False


def test_global_batch_defaults_to_one_pass_and_dtype_is_resolved():
    args = parse_args(["--micro-batch-size", "3"], world_size=4)
    assert (args.global_batch_size, args.grad_accum) == (12, 1)
    assert args.dtype == "float32"  # no GPU here


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--global-batch-size", "10", "--micro-batch-size", "4"], "--global-batch-size 10 is not a multiple"),
        (["--model", "m", "--dataset", "no/such/file.jsonl"], "--dataset: no/such/file.jsonl not found"),
        (["--learning-rate", "1"], "unknown option --learning-rate"),
        (["--lr", "0"], "--lr must be positive"),
        (["--resume", "no/such/checkpoint"], "--resume: no/such/checkpoint is neither"),
        (["--config", "ds_configs/zero3.json", "--fsdp"], "two different engines"),
        (["--resume", "auto"], "--resume auto continues the run in --output-dir"),
    ],
)
def test_bad_options_name_the_option(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_args(argv, world_size=1)


def test_unknown_option_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean --max-steps"):
        parse_args(["--max-step", "3"], world_size=1)


def test_invalid_json_config_names_file_and_line(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text('{\n  "train_batch_size": "auto",\n  "zero_optimization": {"stage": 3,}\n}\n')
    with pytest.raises(ConfigError, match=rf"{config}: invalid JSON at line 3"):
        parse_args(["--config", str(config)], world_size=1)


@pytest.mark.parametrize(
    "content, message",
    [
        ("learning_rate: 0.1\n", "unknown option 'learning_rate'"),
        ("lr: fast\n", "argument --lr: invalid float value"),
        ("quantization: int4\n", "argument --quantization: invalid choice"),
        ("lr: [1, 2\n", "invalid YAML"),
        ("- lr\n", "expected a mapping of option: value"),
    ],
)
def test_recipe_errors_name_the_recipe(tmp_path, content, message):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(content)
    with pytest.raises(ConfigError, match=rf"--recipe {recipe}: {message}"):
        parse_args(["--recipe", str(recipe)], world_size=1)


def test_default_lr_follows_the_measured_rates():
    # k = r at the measured angles (BENCHMARKS.md section 8), a random A at k = 0, log-linear between
    assert default_lr(16, 16, 80.0) == pytest.approx(5e-3) and default_lr(16, 16, 90.0) == pytest.approx(5e-3)
    assert default_lr(16, 16, 65.0) == pytest.approx(2e-3) and default_lr(16, 16, 0.0) == pytest.approx(5e-4)
    assert default_lr(0, 16, 80.0) == pytest.approx(2e-3) and default_lr(4, 16, 0.0) == pytest.approx(2e-3 * 4**-0.25)
    assert default_lr(16, 16, 72.5) == pytest.approx((2e-3 * 5e-3) ** 0.5)
    rates = [default_lr(16, 16, float(angle)) for angle in range(0, 91, 5)]
    assert rates == sorted(rates)
    assert parse_args([], world_size=1).lr == pytest.approx(default_lr(16, 16, DEFAULT_ANGLE))
