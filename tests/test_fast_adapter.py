"""Calibration of the fast rows of A (fast_adapter.py): the sketch against an explicitly formed gradient,
the rows' geometry, what calibration must leave alone, determinism, an nf4 base, the "never calibrated"
warning, and the calibrated A in a saved adapter."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

from lorafa_scale import LoraConfig, LoraFAModel, calibrate, get_peft_model
from lorafa_scale.fast_adapter import DEFAULT_OVERSAMPLE, WHITENING_DAMPING, GradientSketch, fast_adapter_rows
from lorafa_scale.quantization import load_model
from tests.test_model import logits
from tests.tiny_models import save_tiny_llama, tiny_llama

R, K = 8, 2


def largest_angle(rows: torch.Tensor, directions: torch.Tensor) -> float:
    """Largest principal angle (radians) between the spans of rows (k x n) and directions (n x k)."""
    q_rows = torch.linalg.qr(rows.double().T).Q
    q_dirs = torch.linalg.qr(directions.double()).Q
    cosines = torch.linalg.svdvals(q_rows.T @ q_dirs)
    return float(torch.arccos(cosines.min().clamp(max=1.0)))


def batches(count=3, seed=3, vocab=128, shape=(4, 16)):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, shape, generator=generator)
        out.append({"input_ids": ids, "labels": ids})
    return out


def model_with(k=K, seed=0, base=None):
    torch.manual_seed(seed)
    config = LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", fast_adapter_rank=k)
    return get_peft_model(tiny_llama() if base is None else base, config).train()


def exact_statistics(model, data):
    """Per layer: the weight gradient G = sum_t g_t x_t^T and D = mean x^2 over the tokens the loss reaches."""
    layers = model.lora_layers()
    stats = {layer: [0.0, 0.0, 0] for layer in layers}

    def capture(layer, inputs, output):
        x = inputs[0].detach().reshape(-1, layer.in_features).double()

        def on_grad(grad):
            g = grad.reshape(-1, layer.out_features).double()
            live = g.abs().amax(dim=1) > 0
            stats[layer][0] = stats[layer][0] + g.T @ x
            stats[layer][1] = stats[layer][1] + (x[live] ** 2).sum(0)
            stats[layer][2] += int(live.sum())

        output.register_hook(on_grad)

    handles = [layer.register_forward_hook(capture) for layer in layers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "never calibrated": this is the reference pass
        for batch in data:
            model(**batch).loss.backward()
    for handle in handles:
        handle.remove()
    model.zero_grad(set_to_none=True)
    return {layer: (g, sq / n) for layer, (g, sq, n) in stats.items()}


def expected_directions(g, mean_sq, whiten):
    """Top-K right singular vectors of G D^-whiten/2 (G itself at 0), mapped to A's coordinates."""
    w = (mean_sq + WHITENING_DAMPING * mean_sq.mean()) ** (-whiten / 2)
    v = torch.linalg.svd(g * w[None, :]).Vh[:K].T
    return v * w[:, None]  # a_j is proportional to D^-whiten/2 v_j


@pytest.mark.parametrize("whiten", [1.0, 0.5, 0.0], ids=["whitened", "half-whitened", "gradient"])
def test_fast_rows_span_the_top_directions_of_the_explicit_gradient(whiten):
    data = batches()
    model = model_with()
    exact = exact_statistics(model, data)
    # oversampling to the layer width makes the sketch exact: this checks the algebra, not the randomness
    calibrate(model, data, whiten=whiten, angle=0, oversample=128)
    for layer, (g, mean_sq) in exact.items():
        angle = largest_angle(layer.lora_A.weight[:K], expected_directions(g, mean_sq, whiten))
        assert angle < 1e-3, angle


def test_sketch_at_default_oversampling_finds_a_decaying_spectrum():
    """G = U diag(0.7^i) V^T fed as tokens (x_t, g_t) with uneven input scales: at the default oversampling the
    whitened rows span D^-1/2 V_k, and the raw rows span the scaled gradient's own top directions."""
    n_in, n_out, tokens, k = 96, 80, 384, 4
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(n_out, n_out, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n_in, n_in, generator=gen, dtype=torch.float64)).Q
    g_true = u @ torch.diag(0.7 ** torch.arange(n_out, dtype=torch.float64)) @ v[:, :n_out].T
    scales = torch.exp(torch.randn(n_in, generator=gen, dtype=torch.float64))  # input dims of uneven size
    basis = torch.linalg.qr(torch.randn(tokens, n_in, generator=gen, dtype=torch.float64)).Q  # X^T X = I
    x = basis * scales * tokens**0.5  # so D = scales^2 exactly
    grads = basis @ g_true.T / tokens**0.5  # sum_t g_t x_t^T = G diag(scales)
    sketch = GradientSketch(n_in, n_out, k, DEFAULT_OVERSAMPLE, seed=1, device="cpu")
    for chunk in range(0, tokens, 64):
        sketch.add(x[chunk:chunk + 64].float(), grads[chunk:chunk + 64].float())
    d = scales**2
    w = (d + WHITENING_DAMPING * d.mean()).rsqrt()
    whitened = torch.linalg.svd(g_true * scales * w).Vh[:k].T * w[:, None]
    raw = torch.linalg.svd(g_true * scales).Vh[:k].T
    # measured 0.003-0.005 rad over Omega/Psi seeds at oversample 16 (0.08-0.18 at 8)
    assert largest_angle(sketch.fast_rows(whiten=1.0), whitened) < 0.02
    assert largest_angle(sketch.fast_rows(whiten=0.0), raw) < 0.02
    rows = sketch.fast_rows(whiten=1.0).double()
    # each whitened row projects an input token about as much as a random unit row does: RMS sqrt(mean D)
    projection_rms = ((rows**2) * d).sum(1).sqrt()
    assert torch.allclose(projection_rms, d.mean().sqrt().expand(k), rtol=0.1)  # the damping takes ~5%


@pytest.mark.parametrize(("angle", "n_in"), [(30.0, 96), (65.0, 96), (65.0, 10)], ids=["30", "65", "65-narrow"])
def test_turned_rows_keep_the_stated_angle_to_the_calibrated_directions(angle, n_in):
    """angle: in whitened coordinates the turned directions stay orthonormal and each is at exactly `angle`
    from its own calibrated direction, orthogonal to the others: cos(angle) I between the two sets. A layer
    narrower than 2 k (n_in 10, k 6) turns the first n_in - k rows and keeps the others exact."""
    n_out, k = 80, 6
    gen = torch.Generator().manual_seed(4)
    sketch = GradientSketch(n_in, n_out, k, DEFAULT_OVERSAMPLE, seed=2, device="cpu")
    scales = torch.exp(torch.randn(n_in, generator=gen))
    for _ in range(3):
        sketch.add(torch.randn(64, n_in, generator=gen) * scales, torch.randn(64, n_out, generator=gen))
    d = sketch.sq.double() / sketch.tokens.double()
    to_whitened = (d + WHITENING_DAMPING * d.mean()).sqrt() / d.mean().sqrt()  # undoes sqrt(mean D) D^-1/2
    calibrated = sketch.fast_rows().double().T * to_whitened[:, None]
    turned = sketch.fast_rows(angle=angle).double().T * to_whitened[:, None]
    eye = torch.eye(k, dtype=torch.float64)
    cosines = torch.ones(k, dtype=torch.float64)
    cosines[:min(k, n_in - k)] = torch.cos(torch.tensor(angle, dtype=torch.float64).deg2rad())
    assert torch.allclose(turned.T @ turned, eye, atol=1e-5)
    assert torch.allclose(calibrated.T @ turned, torch.diag(cosines), atol=1e-5)
    assert torch.equal(sketch.fast_rows(angle=angle), sketch.fast_rows(angle=angle))


def test_rows_random_part_orthonormal_and_orthogonal_to_the_fast_rows():
    fast = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 5
    a = fast_adapter_rows(fast, 8, seed=11).double()
    assert torch.equal(a[:3].float(), fast)
    assert torch.allclose(a[3:] @ a[3:].T, torch.eye(5, dtype=torch.float64), atol=1e-6)
    assert (a[3:] @ a[:3].T).abs().max() < 1e-5
    assert torch.equal(fast_adapter_rows(fast, 8, seed=11), fast_adapter_rows(fast, 8, seed=11))
    unit = torch.linalg.qr(fast.T).Q.T  # unit orthonormal fast rows (whiten=0): the whole A is orthonormal
    whole = fast_adapter_rows(unit, 8, seed=11).double()
    assert torch.allclose(whole @ whole.T, torch.eye(8, dtype=torch.float64), atol=1e-6)


def test_calibration_changes_only_the_fast_rows_of_a():
    data = batches()
    model = model_with()
    x = data[0]["input_ids"]
    before_logits = logits(model.eval(), x)
    before_a = {layer: layer.lora_A.weight.detach().clone() for layer in model.lora_layers()}
    report = calibrate(model.train(), data)
    assert (report.layers, report.fast_rows, report.batches) == (14, K, 3)
    assert torch.equal(logits(model.eval(), x), before_logits)  # B is still 0
    assert all(p.grad is None for p in model.parameters())  # nothing for the optimizer
    for layer in model.lora_layers():
        a = layer.lora_A.weight.detach()
        assert not torch.allclose(a[:K], before_a[layer][:K])
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        gram = a.double() @ a.double().T
        assert torch.allclose(layer.b_grad_correction.double(), torch.linalg.pinv(gram) / layer.scaling**2,
                              rtol=1e-4, atol=1e-6)


def test_calibration_is_deterministic_for_a_seed():
    data = batches()
    first, second = model_with(seed=5), model_with(seed=5)
    calibrate(first, data)
    calibrate(second, data)
    for a, b in zip(first.lora_layers(), second.lora_layers(), strict=True):
        assert torch.equal(a.lora_A.weight, b.lora_A.weight)


def test_an_nf4_base_calibrates(tmp_path):
    path = save_tiny_llama(tmp_path / "tiny")
    config = LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", fast_adapter_rank=K)
    torch.manual_seed(0)
    model = load_model(path, "nf4", torch.float32, config).train()
    data = batches()
    x = data[0]["input_ids"]
    before = logits(model.eval(), x)
    exact = exact_statistics(model.train(), data)
    calibrate(model, data, angle=0, oversample=128)
    assert torch.equal(logits(model.eval(), x), before)
    for layer, (g, mean_sq) in exact.items():
        assert largest_angle(layer.lora_A.weight[:K], expected_directions(g, mean_sq, 1.0)) < 1e-3


def test_training_uncalibrated_warns_once_and_calibrated_or_loaded_does_not(tmp_path):
    data = batches()
    model = model_with()
    with pytest.warns(UserWarning, match="never calibrated"):
        model(**data[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**data[0])  # once per model
        calibrated = model_with()
        calibrate(calibrated, data)
        calibrated(**data[0])
        model_with(k=0)(**data[0])
        calibrated.save_pretrained(tmp_path / "adapter")
        loaded = LoraFAModel.from_pretrained(tiny_llama(), tmp_path / "adapter", is_trainable=True).train()
        loaded(**data[0])


def test_calibrate_refuses_k0_and_no_batches():
    with pytest.raises(ValueError, match="fast_adapter_rank is 0"):
        calibrate(model_with(k=0), batches())
    model = model_with()
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [])
    assert not model.fast_rows_calibrated
    with pytest.raises(ValueError, match="angle must be between 0 and 90 degrees, got 120"):
        calibrate(model, batches(), angle=120)
    with pytest.raises(ValueError, match="whiten must be between 0 and 1, got 2"):
        calibrate(model, batches(), whiten=2)


def test_gradient_checkpointing_calibrates_the_same_a_and_reentrant_gets_a_clear_error():
    plain = model_with()
    calibrate(plain, batches())
    for reentrant in (False, True):
        base = tiny_llama()
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        checkpointed = model_with(base=base)
        if reentrant:
            with pytest.raises(ValueError, match="reentrant gradient checkpointing cannot run"):
                calibrate(checkpointed, batches())
            assert not checkpointed.fast_rows_calibrated
            continue
        calibrate(checkpointed, batches())  # the layers' hooks fire in the recomputation
        for ours, theirs in zip(plain.lora_layers(), checkpointed.lora_layers(), strict=True):
            torch.testing.assert_close(theirs.lora_A.weight, ours.lora_A.weight, rtol=1e-4, atol=1e-5)


def test_peft_loads_the_calibrated_a(tmp_path):
    model = model_with()
    calibrate(model, batches())
    model.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    ours = model.adapter_state_dict()
    for key, value in theirs.state_dict().items():
        if ".lora_A." in key:
            assert torch.equal(value, ours[key.replace(".default", "")]), key
