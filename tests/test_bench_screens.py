"""bench/adaptation_screens.py: each screen changes what it says while a method is built, and nothing after;
screened runs are never mixed with default ones."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import adaptation  # noqa: E402  (bench/ is scripts, not a package)
from adaptation_screens import SCREENS, SMOLLM2_MLP_WIDTH  # noqa: E402

import lorafa_scale.fast_adapter as fast_adapter  # noqa: E402
from lorafa_scale.fast_adapter import GradientSketch  # noqa: E402


def filled_sketch(in_features: int, out_features: int = 24, k: int = 4, seed: int = 0) -> GradientSketch:
    sketch = GradientSketch(in_features, out_features, k, oversample=4, seed=7, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    scales = torch.rand(in_features, generator=generator) * 3  # input dimensions of unequal size, as in a real model
    for _ in range(3):
        sketch.add(torch.randn(64, in_features, generator=generator) * scales,
                   torch.randn(64, out_features, generator=generator))
    return sketch


def test_plain_turn_mixes_the_exact_rows_with_plain_orthonormal_rows():
    sketch = filled_sketch(40)
    exact, default = sketch.fast_rows(1.0, 0.0).double(), sketch.fast_rows(1.0, 80.0)
    with SCREENS["plain-turn"][0]():
        turned = sketch.fast_rows(1.0, 80.0).double()
        assert torch.equal(sketch.fast_rows(1.0, 0.0), exact.float())
    away = (turned - math.cos(math.radians(80)) * exact) / math.sin(math.radians(80))
    assert torch.allclose(away @ away.T, torch.eye(4, dtype=torch.float64), atol=1e-5)  # plain unit rows
    basis = torch.linalg.qr(exact.T).Q
    assert (away @ basis).abs().max() < 1e-5  # orthogonal to the exact rows' span
    # the default turns in whitened coordinates: its random share is not orthonormal in the plain inner product
    default_away = (default.double() - math.cos(math.radians(80)) * exact) / math.sin(math.radians(80))
    assert not torch.allclose(default_away @ default_away.T, torch.eye(4, dtype=torch.float64), atol=1e-2)
    assert torch.equal(sketch.fast_rows(1.0, 80.0), default)  # restored after the block


def test_damping_and_per_layer_whitening_screens():
    sketch, wide = filled_sketch(40), filled_sketch(SMOLLM2_MLP_WIDTH, k=2)
    default = sketch.fast_rows(1.0, 0.0)
    with SCREENS["damping1"][0]():
        assert fast_adapter.WHITENING_DAMPING == 1.0
        assert not torch.allclose(sketch.fast_rows(1.0, 0.0), default, atol=1e-3)
    assert fast_adapter.WHITENING_DAMPING == 1e-2 and torch.equal(sketch.fast_rows(1.0, 0.0), default)
    raw, wide_raw, wide_default = sketch.fast_rows(0.0, 0.0), wide.fast_rows(0.0, 0.0), wide.fast_rows(1.0, 0.0)
    assert not torch.allclose(raw, default, atol=1e-3) and not torch.allclose(wide_raw, wide_default, atol=1e-3)
    with SCREENS["down-raw"][0]():  # down_proj (the MLP-wide input) raw, the rest whitened
        assert torch.equal(wide.fast_rows(1.0, 0.0), wide_raw) and torch.equal(sketch.fast_rows(1.0, 0.0), default)
    with SCREENS["down-only"][0]():
        assert torch.equal(wide.fast_rows(1.0, 0.0), wide_default) and torch.equal(sketch.fast_rows(1.0, 0.0), raw)


def test_no_correction_screen_builds_layers_without_it():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    for screen, expected in (("no-correction", False), ("none", True)):
        model, _ = adaptation.build("ours-k0", base, [], 0, 0, screen)
        assert {layer.correct_b_grad for layer in model.lora_layers()} == {expected}


def test_screened_runs_are_not_mixed_with_default_ones(tmp_path):
    settings = dict(steps=16, warmup=2, eval_every=4, max_grad_norm=0.0, calib_batches=4)  # recorded before screens
    run = dict(task="labels", method="ours-k16-a80", lr=5e-3, seed=0, curve=[4.0, 1.0], calib_seconds=0.0)
    default = tmp_path / "default.json"
    default.write_text(json.dumps({"runs": [dict(run, settings=settings)]}))
    screened = tmp_path / "screened.json"
    screened.write_text(json.dumps({"runs": [dict(run, seed=1, settings=dict(settings, screen="plain-turn"))]}))
    with pytest.raises(SystemExit) as raised:
        adaptation.main(["--summarize", str(default), str(screened), "--out", str(tmp_path / "m.json"), "--lrs", "5e-3",
                         "--methods", "ours-k16-a80", "--seeds", "0", "1"])
    assert "screened.json has runs with screen plain-turn" in str(raised.value.code)
    assert "default.json has screen none" in str(raised.value.code)
    with pytest.raises(SystemExit) as raised:  # refused before the model loads
        adaptation.main(["--screen", "damping1", "--methods", "peft-lora", "--out", str(tmp_path / "x.json")])
    assert "changes ours only" in str(raised.value.code)
    with pytest.raises(SystemExit) as raised:  # resuming a default file under a screen
        adaptation.main(["--screen", "damping1", "--methods", "ours-k16-a80", "--out", str(default), "--resume",
                         "--steps", "16"])
    assert "this command has screen damping1" in str(raised.value.code)
