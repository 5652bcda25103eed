"""Calibrating the fast rows of A: `fast_adapter_rank` = k rows chosen from data before training.

With A frozen, A's r rows are the only input directions a layer can ever learn in. `calibrate` runs a few
forward + backward passes on training batches and sets, in every LoRA-FA layer, k rows of A to the
directions along which the loss falls fastest; the other r - k rows stay random, orthonormal, and
orthogonal to them. B stays 0, so the model's output does not change.

The math, once. For a layer y = W x the weight gradient over the calibration tokens is
G = sum_t g_t x_t^T (out x in; g_t = dL/dy_t). An update of B moves W by s dB A, and AdamW steps every
coordinate of B by about the learning rate, so row a_j of A moves the output by about lr * |a_j . x|: a
row's per-token projection size acts as that row's learning rate. Rows taken straight from G's top right
singular vectors (LoRA-GA's choice) point along the few high-variance input dimensions and so get a much
larger step than random rows (the issue's trial: they wanted a 5x smaller learning rate, and mixed with
random rows no one rate suited both). So the statistic is the *whitened* gradient M = G D^-1/2, with D the mean square
of each input dimension over the tokens the loss depends on: its top right singular vectors v_j are the
directions of steepest descent per unit of output change (a diagonal Gauss-Newton / Adam-like metric),
and the rows a_j = sqrt(mean D) D^-1/2 v_j have, like a random unit row, a projection of RMS about
sqrt(mean D). They are orthogonal under D^-1, not in the plain inner product; the layer's gradient
correction (A A^T)^-1 handles any A.

`angle` turns the fast rows away from the calibrated directions: in whitened coordinates each v_j becomes
cos(angle) v_j + sin(angle) q_j, with q_1..q_k random, orthonormal and orthogonal to all the v's, so the
turned set is still orthonormal and each row keeps a cos^2 share of its calibrated direction. Measured on
SmolLM2 (BENCHMARKS.md section 8): the exact directions learn a new mapping fast but, on rule tasks, take
only a low learning rate and then stall; turned by 80 degrees (each row keeps cos^2 = 3% of its calibrated
direction, the rest random but whitened) they train at a random A's rate or above and ended below it on
four of five tasks.

Never forming G (a Llama-3-70B MLP layer's is ~0.9 GB in fp32): a one-pass randomized sketch (Tropp et
al. 2017, "Practical sketching algorithms for low-rank matrix approximation") keeps per layer
    range  = G^T Omega  (in x l),   corange = Psi G^T  (l2 x out),   sq = sum_t x_t^2  (in),
with Omega (out x l), Psi (l2 x in) Gaussian, l = k + oversample, l2 = 2 l + 1: O((in + out)(k + p))
numbers (Omega and Psi are redrawn from a seed whenever they are used, so only the sketches are held).
At the end, with w = D^-1/2: Q = orth(w * range) spans M^T's range; since corange =
(Psi D^1/2) M^T, X = (Psi D^1/2 Q)^+ corange ~ Q^T M^T, and M's right singular vectors are Q U, with
X = U S V^T (a small SVD). The sketches are summed over data-parallel ranks before that step, so a run on
n ranks equals one process on the same global batches. Omega and Psi come from the layer's own seed, drawn
by a generator on the sketch's device: deterministic for a seed, the same on every rank (a CUDA generator
draws other numbers than a CPU one, so GPU and CPU runs pick equally good, not identical, rows).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .layer import LoraFALinear

DEFAULT_OVERSAMPLE = 16
DEFAULT_ANGLE = 80.0  # degrees; BENCHMARKS.md section 8
# D is damped by this share of its mean before D^-1/2: input dimensions that are (almost) never active
# would otherwise get unbounded weight.
WHITENING_DAMPING = 1e-2


@dataclass
class CalibrationReport:
    """What `calibrate` did: layers set, batches and tokens seen (summed over ranks), the turn, seconds."""

    layers: int
    fast_rows: int
    batches: int
    tokens: int
    angle: float
    seconds: float

    @property
    def turned(self) -> str:
        return f", turned {self.angle:g} degrees" if self.angle else ""

    def __str__(self) -> str:
        return (f"calibrated {self.fast_rows} fast rows of A in {self.layers} layers from {self.batches} batches "
                f"({self.tokens:,d} tokens{self.turned}) in {self.seconds:.1f} s")


class GradientSketch:
    """The one-pass sketch of one layer's whitened weight gradient (module docstring)."""

    def __init__(self, in_features: int, out_features: int, k: int, oversample: int, seed: int, device):
        self.k, self.seed, self.device = k, seed, torch.device(device)
        self.in_features, self.out_features = in_features, out_features
        self.width = min(k + oversample, in_features, out_features)
        self.co_width = min(2 * self.width + 1, in_features)
        self.range = torch.zeros(in_features, self.width, device=device)
        self.corange = torch.zeros(self.co_width, out_features, device=device)
        self.sq = torch.zeros(in_features, device=device)
        self.tokens = torch.zeros((), device=device)

    def test_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Omega, Psi), drawn afresh from the sketch's seed on its device at each use, never stored: they
        are as large as the sketches themselves, so holding them would double calibration's memory."""
        generator = torch.Generator(self.device).manual_seed(self.seed)
        omega = torch.randn(self.out_features, self.width, generator=generator, device=self.device)
        psi = torch.randn(self.co_width, self.in_features, generator=generator, device=self.device)
        return omega, psi

    @torch.no_grad()
    def add(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """Accumulate sum_t g_t x_t^T's sketches from a layer's inputs and output gradients."""
        # the sketch lives with the layer's weight: on the CPU when FSDP2 offloads it, while x and g are on the GPU
        x = x.reshape(-1, x.shape[-1]).to(self.device, torch.float32)
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(self.device, torch.float32)
        live = g.abs().amax(dim=1) > 0  # tokens the loss depends on (not padding, not after the last label)
        x, g = x[live], g[live]
        omega, psi = self.test_matrices()
        self.range += x.T @ (g @ omega)
        self.corange += (psi @ x.T) @ g
        self.sq += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.range, self.corange, self.sq, self.tokens]

    @torch.no_grad()
    def fast_rows(self, whiten: float = 1.0, angle: float = 0.0) -> torch.Tensor:
        """(k x in) fp32: sqrt(mean D) D^-1/2 v_j for the top-k right singular vectors v_j of G D^-1/2.

        whiten: the power p of the weighting, D^-p/2 (1, the default, as above; 0: unit rows along G's own
        top right singular vectors, LoRA-GA's directions; 0.5: D^-1/4, half-way).
        angle (degrees): each v_j turned by it toward a random unit vector orthogonal to all of them."""
        mean_sq = self.sq.double() / self.tokens.double().clamp(min=1)
        mean = mean_sq.mean().clamp(min=torch.finfo(torch.float32).tiny)
        power = -whiten / 2
        w = (mean_sq + WHITENING_DAMPING * mean) ** power  # all ones when whiten = 0
        q = torch.linalg.qr(w[:, None] * self.range.double()).Q  # (in x l): M^T's range
        psi = self.test_matrices()[1].double()
        core = torch.linalg.lstsq(psi / w[None, :] @ q, self.corange.double()).solution
        u = torch.linalg.svd(core, full_matrices=False).U  # (l x l), singular values descending
        directions = q @ u[:, : self.k]  # (in x k), orthonormal, in whitened coordinates
        # a sign convention (largest entry positive), so that float-level differences never flip a row, nor
        # (below) the way it turns
        directions *= directions.gather(0, directions.abs().argmax(0, keepdim=True)).sign()
        if angle:
            # CPU-drawn, so the same on any device; a seed apart from Omega's and Psi's, and from A's random rows'
            generator = torch.Generator().manual_seed(self.seed + 1)
            turned = min(self.k, self.in_features - self.k)  # a layer narrower than 2 k has room to turn fewer
            away = torch.randn(self.in_features, turned, dtype=torch.float64, generator=generator).to(q.device)
            away = torch.linalg.qr(away - directions @ (directions.T @ away)).Q
            radians = math.radians(angle)
            directions[:, :turned] = math.cos(radians) * directions[:, :turned] + math.sin(radians) * away
        return (directions * (w / mean**power)[:, None]).T.float()


def fast_adapter_rows(fast: torch.Tensor, r: int, seed: int) -> torch.Tensor:
    """A (r x in): the k fast rows, then r - k random orthonormal rows orthogonal to the fast rows' span."""
    k, in_features = fast.shape
    generator = torch.Generator().manual_seed(seed)
    rest = torch.randn(r - k, in_features, dtype=torch.float64, generator=generator)
    if k:
        basis = torch.linalg.qr(fast.double().T).Q  # (in x k)
        rest -= (rest @ basis) @ basis.T
    if r > k:
        rest = torch.linalg.qr(rest.T).Q.T
    return torch.cat([fast.double(), rest]).float()


def _lora_model(model: nn.Module) -> nn.Module:
    """The LoraFAModel inside a DeepSpeed engine (engine.module), or the model itself."""
    deepspeed = sys.modules.get("deepspeed")  # an engine exists only if DeepSpeed was imported
    return model.module if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine) else model


def _assign(param: torch.Tensor, full: torch.Tensor, layer: LoraFALinear) -> None:
    """Copy a full tensor into A, whole, FSDP2-sharded (DTensor) or ZeRO-3-partitioned; refresh the correction.

    Collective when sharded: every rank passes the same full tensor."""
    full = full.to(param.device)
    if hasattr(param, "ds_id"):  # ZeRO-3: write the gathered weight; rank 0's copy is kept (all hold the same)
        from .engines.deepspeed import gathered

        with gathered([param], modifier_rank=0):
            param.copy_(full)
            layer.refresh_b_grad_correction()
        return
    if isinstance(param, DTensor):  # FSDP2: each rank keeps its shard
        full = distribute_tensor(full, param.device_mesh, param.placements)
    param.copy_(full)
    layer.refresh_b_grad_correction()


def _sum_over_ranks(tensors: list[torch.Tensor]) -> None:
    """All-reduce (sum) in place, through the GPU when the backend is NCCL (it takes no CPU tensors)."""
    nccl = torch.distributed.get_backend() == "nccl"
    for tensor in tensors:
        moved = tensor.cuda() if nccl and not tensor.is_cuda else tensor
        torch.distributed.all_reduce(moved)
        if moved is not tensor:
            tensor.copy_(moved)


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """model(**batch).loss, the batch's tensors moved to the model's input embeddings' device."""
    device = _lora_model(model).get_base_model().get_input_embeddings().weight.device
    return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).loss


def calibrate(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] = default_loss,
    oversample: int = DEFAULT_OVERSAMPLE,
    whiten: float = 1.0,
    angle: float = DEFAULT_ANGLE,
    progress: bool = False,
) -> CalibrationReport:
    """Set the fast rows of A in every LoRA-FA layer from the gradients of `batches` (module docstring).

    model: a LoraFAModel (plain, bitsandbytes, FSDP2-sharded) or a DeepSpeed engine around one; k is its
    config's fast_adapter_rank. batches: dicts `loss_fn(model, batch)` takes (default: model(**batch).loss,
    so input_ids / attention_mask / labels). Each rank passes its own batches; collective when
    torch.distributed is initialised. No parameter's .grad is touched and the optimizer sees nothing; B
    stays 0. whiten: the power p of the input weighting D^-p/2 (1: the whitened gradient above; 0: G's own
    singular vectors as unit rows, LoRA-GA's directions; in between: partly whitened; the ablations in
    bench/adaptation.py). angle: degrees by which each fast row is turned from its calibrated direction
    toward a random one orthogonal to all of them (0: exactly the calibrated directions; module docstring).
    Returns a CalibrationReport (its str is a one-line summary).
    """
    started = time.perf_counter()
    lora_model = _lora_model(model)
    k = lora_model.config_lorafa.fast_adapter_rank
    if k == 0:
        raise ValueError("calibrate: fast_adapter_rank is 0 in this model's config; nothing to calibrate")
    if not 0.0 <= angle <= 90.0:
        raise ValueError(f"calibrate: angle must be between 0 and 90 degrees, got {angle}")
    if not 0.0 <= whiten <= 1.0:
        raise ValueError(f"calibrate: whiten must be between 0 and 1, got {whiten}")
    layers = lora_model.lora_layers()
    sketches = {}
    for layer in layers:
        device = layer.base_layer.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        sketches[layer] = GradientSketch(layer.in_features, layer.out_features, k, oversample,
                                         layer.init_seed + 1, device)

    def capture(layer, inputs, output):
        if torch.is_grad_enabled() and output.requires_grad:
            x = inputs[0].detach()
            output.register_hook(lambda grad, x=x, layer=layer: sketches[layer].add(x, grad))

    def embedded(module, inputs, output):
        if not output.requires_grad:  # a frozen embedding: gradients must still flow to every layer
            output.requires_grad_(True)
        embeddings.append(output)

    embeddings: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(capture) for layer in layers]
    handles.append(lora_model.get_base_model().get_input_embeddings().register_forward_hook(embedded))
    count, calibrated_before = 0, lora_model.fast_rows_calibrated
    lora_model.fast_rows_calibrated = True  # no "never calibrated" warning from calibration's own passes
    try:
        items = batches
        if progress:
            from tqdm import tqdm

            items = tqdm(batches, desc="calibrating fast rows", unit="batch", dynamic_ncols=True)
        for batch in items:
            loss = loss_fn(model, batch)
            # The gradient of the embeddings' output, not backward(): it runs through every layer's hook
            # above but reaches no parameter, so no .grad is written and neither the optimizer nor an
            # engine's gradient hooks (ZeRO-3's reduction, FSDP2's reduce-scatter) see anything.
            try:
                torch.autograd.grad(loss, embeddings)
            except RuntimeError as error:
                if "use_reentrant" not in str(error):
                    raise
                raise ValueError(
                    "calibrate: reentrant gradient checkpointing cannot run the gradient calibration takes; "
                    "enable it with gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' "
                    "default), or calibrate before enabling it"
                ) from None
            embeddings.clear()
            count += 1
    finally:
        lora_model.fast_rows_calibrated = calibrated_before
        for handle in handles:
            handle.remove()
    batches_seen = torch.tensor(float(count))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        _sum_over_ranks([batches_seen])
    if int(batches_seen) == 0:
        raise ValueError("calibrate: no batches were given")
    tokens = 0
    for layer in layers:
        sketch = sketches.pop(layer)
        if distributed:
            _sum_over_ranks(sketch.tensors())
        tokens = max(tokens, int(sketch.tokens))
        rows = fast_adapter_rows(sketch.fast_rows(whiten, angle), layer.r, layer.init_seed)
        with torch.no_grad():
            _assign(layer.lora_A.weight, rows, layer)
    lora_model.fast_rows_calibrated = True
    return CalibrationReport(len(layers), k, int(batches_seen), tokens, angle, time.perf_counter() - started)


def warn_if_uncalibrated(lora_model: nn.Module) -> None:
    """Once per model: a training forward with fast_adapter_rank > 0 and A never calibrated nor loaded."""
    if getattr(lora_model, "_warned_uncalibrated", False):
        return
    lora_model._warned_uncalibrated = True
    k = lora_model.config_lorafa.fast_adapter_rank
    warnings.warn(
        f"fast_adapter_rank={k} but A was never calibrated: all its rows are random, as with "
        "fast_adapter_rank=0. Call lorafa_scale.calibrate(model, batches) before training "
        "(launch/train.py does it with --calibration-batches).",
        stacklevel=5,  # the caller of model(...): past forward and nn.Module's call machinery
    )


__all__ = ["CalibrationReport", "GradientSketch", "calibrate", "fast_adapter_rows"]
