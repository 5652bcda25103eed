"""Memory planner: what a LoRA-FA (or LoRA) fine-tuning job needs per GPU, before renting the GPUs.

    job = Job(geometry=load_geometry("llama-3-70b"), strategy="zero3", quantization="nf4", gpus_per_node=8)
    print(format_plan(plan(job)))            # or: lorafa-scale plan llama-3-70b --strategy zero3 --quant nf4

Activations: bytes autograd keeps for backward in a Llama decoder layer with a frozen base and flash-style
attention (PyTorch SDPA or flash-attention: q, k, v, the output and a float32 log-sum-exp, never the s x s
matrix), per token (h hidden, f intermediate, kv = kv heads x head_dim, d the dtype's bytes):

    two RMSNorm inputs           2 (4h + 4)          transformers upcasts to float32 inside RMSNorm
    q, k, v, attention output    (2h + 2kv) d + 4 heads
    MLP gate, silu(gate), up     3f d
    each adapted layer           LoRA-FA: r d        (A dropout(x), see layer.py)
                                 LoRA: in 4 + in m + 4r   (dropout(x) upcast to float32, the dropout mask of
                                 m bytes (1 on CUDA, 4 on CPU), and A x; with dropout 0 only x itself)

The first layer's first norm and its q/k/v dropout masks keep nothing (their input needs no gradient).
The model adds the final norm's input, rotary cos/sin, the float32 log-softmax of the logits and the labels.
Lean mode (`lean=True`, lorafa_scale.lean): each RMSNorm keeps its input in its own dtype (h d), the MLP
gate and up (2f d), and the model keeps the final norm's input and the gradient of the final hidden states
(2h d per token) instead of the log-softmax and the labels.
tests/jobs/test_planner.py checks this against saved_tensors_hooks on real training steps.

Calibration (fast_adapter_rank k > 0, `calibration_bytes` and `sketch_bytes`): the job's first passes also
hold each adapted layer's input until backward reaches it (as PEFT LoRA in float32 without dropout keeps it)
and a sketch of (in + out)(3l + 1) float32 values per adapted layer (l = k + 16); the "while calibrating" line is
the peak then. A sketch lives on its weight's device: under fsdp2-offload that is the CPU, so there the
sketches count per node (one per rank) in "CPU per node while calibrating", not on the GPU.
tests/jobs/test_planner.py checks the held inputs against the tensors calibrate holds.

Everything else is an estimate stated in its line: frozen base weights keep nothing of their input; trained
adapter parameters are float32 with AdamW (4 bytes weight + 4 gradient + 8 optimizer state); A is float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cli_args import Parser, add_renamed, comma_list, deprecated, dtype_type
from ..config import ConfigError
from ..fast_adapter import DEFAULT_OVERSAMPLE
from .presets import GEOMETRIES, ModelGeometry

GiB = 2**30
STRATEGIES = ("single", "zero2", "zero3", "zero3-offload", "fsdp2", "fsdp2-offload")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# bitsandbytes 4-bit with double quantization: 4 bits + an 8-bit absmax per 64 values + a float32 per 256 absmax.
NF4_BYTES_PER_VALUE = (4 + 8 / 64 + 32 / (64 * 256)) / 8
INT8_BYTES_PER_VALUE = 1  # plus one float32 scale per output row, counted separately
LLAMA_LAYOUT_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class Job:
    """One training job. targets: adapted linear layers of each decoder layer (names from ALL_TARGETS)."""

    geometry: ModelGeometry
    strategy: str = "single"
    quantization: str = "none"
    nodes: int = 1
    gpus_per_node: int = 1
    micro_batch: int = 1
    seq_len: int = 2048
    r: int = 16
    targets: tuple[str, ...] = ALL_TARGETS
    method: str = "lorafa"  # "lorafa": A frozen, B trained; "lora": both trained (PEFT LoRA)
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = False
    dtype: str = "bf16"
    device: str = "cuda"  # "cpu" only changes the dropout mask's size (CPU keeps it in the input's dtype)
    gpu_memory_gib: float = 80.0
    reserve_gib: float = 1.0  # CUDA context, NCCL buffers, allocator fragmentation: an assumption
    lean: bool = False  # lorafa_scale.lean: chunked head + loss, SwiGLU and RMSNorm keeping only their inputs
    fast_adapter_rank: int = 0  # k > 0: the job calibrates k rows of A on its micro batches before step 0

    def __post_init__(self):
        choices = {"strategy": STRATEGIES, "quantization": QUANTIZATIONS, "method": ("lorafa", "lora"),
                   "dtype": tuple(DTYPE_BYTES), "device": ("cuda", "cpu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"plan: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("nodes", "gpus_per_node", "micro_batch", "seq_len", "r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"plan: {name} must be a positive integer, got {value!r}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"plan: targets must be a non-empty subset of {ALL_TARGETS}, got {list(self.targets)}")
        k = self.fast_adapter_rank
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.r or (k and self.method == "lora"):
            raise ConfigError(f"plan: fast_adapter_rank must be an integer in [0, r={self.r}] (0 with method "
                              f"lora), got {k!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"plan: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.quantization == "int8" and self.strategy in ("zero3", "zero3-offload", "fsdp2", "fsdp2-offload"):
            raise ConfigError("plan: int8 weights cannot be sharded by ZeRO-3 or FSDP2; use nf4 (packed in the "
                              "model dtype) or zero2")
        if self.seq_len > self.geometry.max_position_embeddings:
            raise ConfigError(f"plan: seq_len={self.seq_len} exceeds the model's max_position_embeddings="
                              f"{self.geometry.max_position_embeddings}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass
class Plan:
    """Per-GPU bytes by line, per-node CPU bytes for offload, and the verdict."""

    job: Job
    gpu: dict[str, int]
    temporary: dict[str, int]
    cpu_per_node: dict[str, int] = field(default_factory=dict)
    load_peak: int = 0  # bytes on each GPU while loading, before sharding (0: never above the training total)
    calibration: dict[str, int] = field(default_factory=dict)  # bytes calibration adds (fast_adapter_rank > 0)
    calibration_cpu_per_node: dict[str, int] = field(default_factory=dict)  # its sketches, where they live on the CPU
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def calibration_peak(self) -> int:
        """Bytes on each GPU while calibrating: the training total, its activations replaced by calibration's."""
        if not self.calibration:
            return 0
        return self.gpu_total - self.gpu["activations"] + sum(self.calibration.values())

    @property
    def fits(self) -> bool:
        return max(self.gpu_total, self.load_peak, self.calibration_peak) <= self.job.gpu_memory_gib * GiB

    def to_dict(self) -> dict:
        job = {k: v for k, v in dataclasses.asdict(self.job).items() if k != "geometry"}
        job["model"] = self.job.geometry.hf_id
        return {"job": job, "gpu_bytes": self.gpu, "temporary_bytes": self.temporary,
                "gpu_total_bytes": self.gpu_total, "load_peak_bytes": self.load_peak,
                "calibration_bytes": self.calibration, "calibration_peak_bytes": self.calibration_peak,
                "calibration_cpu_per_node_bytes": self.calibration_cpu_per_node,
                "cpu_per_node_bytes": self.cpu_per_node, "fits": self.fits, "notes": self.notes}


# -- model geometry -------------------------------------------------------------------------------------------
def load_geometry(model: str) -> ModelGeometry:
    """A preset name (lorafa_scale.jobs.presets.GEOMETRIES), or a Hugging Face config.json (the file or its folder)."""
    if model in GEOMETRIES:
        return GEOMETRIES[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        close = difflib.get_close_matches(model, GEOMETRIES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"plan: '{model}' is neither a preset ({', '.join(GEOMETRIES)}) nor a config.json{hint}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"plan: {path}: not valid JSON (line {error.lineno})") from None
    if config.get("model_type") not in LLAMA_LAYOUT_TYPES:
        raise ConfigError(f"plan: {path}: model_type {config.get('model_type')!r} is not a Llama-layout model "
                          f"({', '.join(LLAMA_LAYOUT_TYPES)})")
    fields_ = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    for name in fields_:
        if not isinstance(config.get(name), int):
            raise ConfigError(f"plan: {path}: field '{name}' is missing or not an integer")
    heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // heads):
        raise ConfigError(f"plan: {path}: head_dim={config['head_dim']} differs from hidden_size / "
                          "num_attention_heads; the planner assumes they are equal")
    return ModelGeometry(
        hf_id=config.get("_name_or_path") or str(path.parent), **{name: config[name] for name in fields_},
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        max_position_embeddings=config.get("max_position_embeddings", 2**31 - 1),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), model_type=config["model_type"],
    )


def kv_width(geometry: ModelGeometry) -> int:
    return geometry.num_key_value_heads * geometry.head_dim


def adapter_values(geometry: ModelGeometry, r: int, targets) -> tuple[int, int]:
    """(values in all A matrices, values in all B matrices) for rank r on `targets` of every decoder layer."""
    shapes = geometry.linear_shapes()
    a = sum(r * shapes[t][0] for t in targets) * geometry.num_hidden_layers
    b = sum(shapes[t][1] * r for t in targets) * geometry.num_hidden_layers
    return a, b


# -- activations (validated) ---------------------------------------------------------------------------------
# Where each adapted layer sits in a decoder layer, in forward order. In the first layer nothing before the
# first adapted layer needs a gradient (the embeddings are frozen), so autograd keeps nothing there.
STAGE = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 4, "up_proj": 4, "down_proj": 5}
ATTENTION, POST_NORM, MLP = 1.5, 3, 4.5  # stages of the attention kernel, the second norm, silu(gate) * up
SHARED_INPUT = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                "gate_proj": "mlp input", "up_proj": "mlp input"}


def activation_bytes_per_token(job: Job, first_layer: bool = False) -> float:
    """Bytes one token keeps for backward in one decoder layer (no checkpointing)."""
    g, d = job.geometry, DTYPE_BYTES[job.dtype]
    h, f = g.hidden_size, g.intermediate_size
    grad_from = min(STAGE[t] for t in job.targets) if first_layer else 0

    def kept(stage: float) -> bool:  # does the input of the op at `stage` need a gradient?
        return grad_from < stage

    # transformers' RMSNorm keeps its input upcast to float32, and 1/rms; lean: the input in its dtype
    norm = h * d if job.lean else 4 * h + 4
    total = (0 if first_layer else norm) + (norm if kept(POST_NORM) else 0)
    if kept(ATTENTION):
        total += (2 * h + 2 * kv_width(g)) * d + 4 * g.num_attention_heads  # q, k, v, output, log-sum-exp
    if kept(MLP):
        total += (2 if job.lean else 3) * f * d  # gate, silu(gate), up; lean: gate and up
    return total + sum(adapter_bytes_per_token(job, t, kept(STAGE[t]), kept(ATTENTION)) for t in job.targets)


def adapter_bytes_per_token(job: Job, target: str, input_needs_grad: bool, attention_kept: bool) -> float:
    in_features, r, d = job.geometry.linear_shapes()[target][0], job.r, DTYPE_BYTES[job.dtype]
    if job.method == "lorafa":
        return r * d  # A dropout(x)
    if job.lora_dropout > 0:  # dropout(x) upcast to float32, its mask, A x
        mask = (1 if job.device == "cuda" else 4) if input_needs_grad else 0
        return (4 + mask) * in_features + 4 * r
    if job.dtype != "fp32":  # each adapter keeps its own float32 copy of x
        return 4 * in_features + 4 * r
    # float32 without dropout: A keeps x itself
    return (4 * in_features if _owns_input(job, target, attention_kept) else 0) + 4 * r


def _owns_input(job: Job, target: str, attention_kept: bool) -> bool:
    """Whether keeping this layer's input costs bytes of its own: an input shared by several adapters counts
    once (for the first of them); o_proj's input is the attention output, which the attention keeps when kept."""
    if target == "o_proj":
        return not attention_kept
    if target in SHARED_INPUT:
        sharers = [t for t in ALL_TARGETS if t in job.targets and SHARED_INPUT.get(t) == SHARED_INPUT[target]]
        return target == sharers[0]
    return True


def model_activation_bytes(job: Job) -> float:
    """Bytes kept outside the decoder layers: final norm, rotary cos/sin (per position), log-softmax, labels."""
    g = job.geometry
    per_token = (4 * g.hidden_size + 4) + 4 * g.vocab_size + 8
    if job.lean:  # the final norm's input and the gradient of the final hidden states
        per_token = 2 * g.hidden_size * DTYPE_BYTES[job.dtype]
    rotary_kept = g.num_hidden_layers > 1 or any(STAGE[t] < ATTENTION for t in job.targets)
    rotary = job.seq_len * 2 * g.head_dim * DTYPE_BYTES[job.dtype] if rotary_kept else 0
    return job.tokens * per_token + rotary + (0 if job.lean else 4)  # + the loss itself


def _activations(job: Job, first_layer: float, per_layer: float, checkpointing: bool) -> int:
    """Bytes at the peak from per-token bytes of the first and each other decoder layer: all layers kept,
    or with checkpointing the layer inputs and one recomputed layer; plus what the model keeps outside them."""
    g = job.geometry
    if checkpointing:
        layers = g.num_hidden_layers * g.hidden_size * DTYPE_BYTES[job.dtype] + per_layer
    else:
        layers = first_layer + (g.num_hidden_layers - 1) * per_layer
    return round(job.tokens * layers + model_activation_bytes(job))


def kept_for_backward(job: Job) -> int:
    """Bytes autograd keeps at the end of forward for one micro batch, without gradient checkpointing."""
    return _activations(job, activation_bytes_per_token(job, first_layer=True), activation_bytes_per_token(job), False)


def peak_activation_bytes(job: Job) -> int:
    """Activation memory at its peak: all kept bytes, or with checkpointing the layer inputs + one layer."""
    return _activations(job, activation_bytes_per_token(job, first_layer=True), activation_bytes_per_token(job),
                        job.gradient_checkpointing)


def calibration_bytes(job: Job) -> dict[str, int]:
    """What calibrating k fast rows (lorafa_scale.calibrate) holds on each GPU beyond the weights and sketches.

    Its passes keep what a training forward keeps, all of the first layer too (the embeddings' output needs
    a gradient), plus each adapted layer's input, held by the layer's gradient hook until backward reaches it."""
    if not job.fast_adapter_rank:
        return {}
    g, d = job.geometry, DTYPE_BYTES[job.dtype]
    held = sum(g.linear_shapes()[t][0] * d for t in job.targets if _owns_input(job, t, attention_kept=True))
    per_layer = activation_bytes_per_token(job) + held  # the first layer too
    return {"activations and held inputs": _activations(job, per_layer, per_layer, job.gradient_checkpointing)}


def sketch_bytes(job: Job) -> dict[str, int]:
    """What calibration's sketches take on each rank, on their weight's device (calibration_bytes' companion).

    Each layer's sketch (fast_adapter.GradientSketch: the range and corange sketches, the squares; unsharded
    on every rank); and, while a sketch takes in a micro batch, float32 copies of one layer's live inputs and
    output gradients and its test matrices Omega and Psi, drawn for that update only."""
    if not job.fast_adapter_rank:
        return {}
    g = job.geometry
    sketches, update = 0, 0
    for target in job.targets:
        in_features, out_features = g.linear_shapes()[target]
        width = min(job.fast_adapter_rank + DEFAULT_OVERSAMPLE, in_features, out_features)
        co_width = min(2 * width + 1, in_features)
        sketches += 4 * (in_features * width + co_width * out_features + in_features + 1) * g.num_hidden_layers
        test_matrices = 4 * (out_features * width + co_width * in_features)
        update = max(update, 8 * job.tokens * (in_features + out_features) + test_matrices)
    return {"fast-row sketches": sketches, "sketch update": update}


# -- the plan ------------------------------------------------------------------------------------------------
def _base_weight_bytes(job: Job) -> tuple[int, int, int]:
    """(decoder linear weights, one decoder layer, embeddings + head + norms) in their stored form."""
    g, d = job.geometry, DTYPE_BYTES[job.dtype]
    linear_values = sum(i * o for i, o in g.linear_shapes().values())
    if job.quantization in ("nf4", "fp4"):
        linear = linear_values * NF4_BYTES_PER_VALUE
    elif job.quantization == "int8":
        linear = linear_values * INT8_BYTES_PER_VALUE + 4 * sum(o for _, o in g.linear_shapes().values())
    else:
        linear = linear_values * d
    layer = linear + 2 * g.hidden_size * d
    outside = (g.num_parameters() - g.num_hidden_layers * (linear_values + 2 * g.hidden_size)) * d
    return round(linear * g.num_hidden_layers), round(layer), round(outside)


def plan(job: Job) -> Plan:
    g, d = job.geometry, DTYPE_BYTES[job.dtype]
    world = job.world_size
    sharded = job.strategy in ("zero3", "zero3-offload", "fsdp2", "fsdp2-offload")
    offload = job.strategy.endswith("-offload")
    states_sharded = job.strategy != "single"  # ZeRO-2 and up partition gradients and optimizer state
    linear, layer, outside = _base_weight_bytes(job)
    base = linear + outside
    a_values, b_values = adapter_values(g, job.r, job.targets)
    trained = b_values + (a_values if job.method == "lora" else 0)
    notes = []

    gpu = {
        "base weights": 0 if offload else base // (world if sharded else 1),
        "adapter A": 0 if offload else 4 * a_values // (world if sharded else 1),
        "adapter B": 0 if offload else 4 * b_values // (world if sharded else 1),
        "gradients": 0 if offload else 4 * trained // (world if states_sharded else 1),
        "optimizer state": 0 if offload else 8 * trained // (world if states_sharded else 1),
        "activations": peak_activation_bytes(job),
    }
    head = g.vocab_size * g.hidden_size * d
    temporary = {}
    if job.strategy.startswith("zero3"):
        temporary["gathered parameters"] = max(2 * layer, layer + head)  # current + prefetched layer, or the head
    elif job.strategy.startswith("fsdp2"):
        temporary["gathered parameters"] = 2 * layer + outside  # FSDP2 keeps the root (embeddings, head) unsharded
    if job.quantization != "none":
        largest = max(i * o for i, o in g.linear_shapes().values())
        temporary["dequantized weight"] = largest * d  # bitsandbytes dequantizes one weight per matmul
    if job.strategy.startswith("zero"):
        temporary["gradient buckets"] = 4 * min(trained, g.hidden_size**2)  # reduce_bucket_size "auto" = h^2
    if job.lean:  # one chunk of tokens at a time (lean.default_chunk_tokens): logits, float32 copy, gradient
        from ..lean.loss import default_chunk_tokens

        temporary["logits and loss"] = min(job.tokens, default_chunk_tokens(g.vocab_size)) * g.vocab_size * (2 * d + 4)
    else:
        temporary["logits and loss"] = job.tokens * g.vocab_size * (d + 8)  # logits, float32 upcast and its gradient
    temporary["backward workspace"] = round(job.tokens * activation_bytes_per_token(job))  # one layer's gradients
    gpu["temporary buffers"] = sum(temporary.values())
    gpu["runtime reserve"] = round(job.reserve_gib * GiB)

    cpu = {}
    if offload:
        per_node = job.gpus_per_node / world
        cpu = {"base weights": round(base * per_node), "adapter A": round(4 * a_values * per_node),
               "trained state": round(16 * trained * per_node)}  # trained weights, gradients, AdamW
    load_peak = 0
    if job.strategy.startswith("zero3") and job.quantization != "none":
        # DeepSpeed's zero.Init does not apply to bitsandbytes models: each rank loads the whole quantized model.
        load_peak = base + gpu["runtime reserve"]
        notes.append("ZeRO-3 with a quantized base: every GPU holds the whole quantized model while loading")
    calibration, calibration_cpu = calibration_bytes(job), {}
    if job.strategy == "fsdp2-offload":
        # a sketch lives on its weight's device, the CPU under FSDP2's offload: one per rank, unsharded
        calibration_cpu = {name: part * job.gpus_per_node for name, part in sketch_bytes(job).items()}
    else:
        calibration.update(sketch_bytes(job))
    result = Plan(job, gpu, temporary, cpu, load_peak, calibration, calibration_cpu, notes)
    if job.gradient_checkpointing and job.method == "lorafa":
        # Only where it is true: presets turn checkpointing on where the job would not fit without it.
        without = plan(dataclasses.replace(job, gradient_checkpointing=False))
        if without.fits:
            notes.append(f"fits without gradient checkpointing too ({without.gpu_total / GiB:.2f} GiB): try "
                         "--no-gradient-checkpointing, LoRA-FA saves activations only in the recomputed layer")
    return result


# -- the seed's table ----------------------------------------------------------------------------------------
def seed_table(r: int = 16, targets=("q_proj", "v_proj")) -> list[dict]:
    """The seed card's "Memory Efficiency" table, computed: adapter size and training state per named model."""
    rows = []
    for name, geometry in GEOMETRIES.items():
        a, b = adapter_values(geometry, r, targets)
        rows.append({"model": name, "base_parameters": geometry.num_parameters(), "adapter_parameters": a + b,
                     "trained_parameters": b, "adapter_file_bytes": 4 * (a + b),
                     "training_state_bytes": 4 * (a + b) + 12 * b})
    return rows


def format_seed_table(rows: list[dict], r: int, targets) -> str:
    lines = [f"LoRA-FA adapter size, r={r} on {', '.join(targets)} (float32; trained = B only, with AdamW)",
             "| Model | Base parameters | LoRA-FA parameters (A+B) | Trained (B) | Adapter file | Training state |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {row['base_parameters'] / 1e9:.2f}B | {row['adapter_parameters'] / 1e6:.1f}M"
                     f" | {row['trained_parameters'] / 1e6:.1f}M | {row['adapter_file_bytes'] / 1e6:.0f} MB"
                     f" | {row['training_state_bytes'] / 1e6:.0f} MB |")
    return "\n".join(lines)


def format_plan(result: Plan) -> str:
    job = result.job
    method = "LoRA-FA" if job.method == "lorafa" else "LoRA"
    quant = f" + {job.quantization}" if job.quantization != "none" else ""
    lines = [
        f"{job.geometry.hf_id}: {job.strategy}{quant}, {job.nodes} node(s) x {job.gpus_per_node} GPU(s), "
        f"micro batch {job.micro_batch} x {job.seq_len} tokens, {method} r={job.r} on {len(job.targets)} "
        f"layer types, dropout {job.lora_dropout}, {job.dtype}, gradient checkpointing "
        f"{'on' if job.gradient_checkpointing else 'off'}{', lean' if job.lean else ''}",
        f"{'per GPU':<34}{'GiB':>9}",
    ]
    for name, value in result.gpu.items():
        lines.append(f"  {name:<32}{value / GiB:9.2f}")
        if name == "temporary buffers":
            lines += [f"    {sub:<30}{part / GiB:9.2f}" for sub, part in result.temporary.items()]
    lines.append(f"  {'total':<32}{result.gpu_total / GiB:9.2f}")
    if result.load_peak:
        lines.append(f"  {'while loading':<32}{result.load_peak / GiB:9.2f}")
    if result.calibration:
        lines.append(f"  {f'while calibrating (k={job.fast_adapter_rank})':<32}{result.calibration_peak / GiB:9.2f}")
        lines += [f"    {name:<30}{part / GiB:9.2f}" for name, part in result.calibration.items()]
    for name, value in result.cpu_per_node.items():
        lines.append(f"  {'CPU per node, ' + name:<32}{value / GiB:9.2f}")
    if result.cpu_per_node:
        lines.append(f"  {'CPU per node total':<32}{sum(result.cpu_per_node.values()) / GiB:9.2f}")
    if result.calibration_cpu_per_node:
        total = sum(result.cpu_per_node.values()) + sum(result.calibration_cpu_per_node.values())
        lines.append(f"  {'CPU per node while calibrating':<32}{total / GiB:9.2f}")
        lines += [f"    {name:<30}{part / GiB:9.2f}" for name, part in result.calibration_cpu_per_node.items()]
    needed = max(result.gpu_total, result.load_peak, result.calibration_peak) / GiB
    verdict = "fits" if result.fits else "does NOT fit"
    lines.append(f"{verdict} in {job.gpu_memory_gib:g} GiB per GPU ({needed:.2f} GiB needed)")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


# -- measurement ---------------------------------------------------------------------------------------------
def measure_kept_bytes(step, module: torch.nn.Module) -> int:
    """Bytes of unique storages autograd keeps for backward while `step()` runs a forward pass.

    The module's own parameters and buffers are not counted (they exist anyway). `step` should return the
    loss; it is backpropagated so the graph is freed. This is the measured counterpart of kept_for_backward.
    """
    return measure_kept(step, module)[0]


def measure_kept(step, module: torch.nn.Module) -> tuple[int, int]:
    """(activation bytes, bytes of the module's own parameters and buffers) autograd keeps during `step()`."""
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    loss.backward()
    activations = sum(size for ptr, size in kept.items() if ptr not in own)
    return activations, sum(size for ptr, size in kept.items() if ptr in own)


# -- command line --------------------------------------------------------------------------------------------
def _targets(text: str) -> tuple[str, ...]:
    return ALL_TARGETS if text == "all-linear" else tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser() -> Parser:
    p = Parser(prog="lorafa-scale plan", description="Per-GPU memory of a fine-tuning job, before renting the GPUs. "
               "Every setting not given is the preset's (the size table of lorafa_scale/jobs/presets.py), so "
               "`plan --preset X` plans what `lorafa-scale launch --preset X` runs. Options have the trainer's names.")
    add = p.add_argument
    add("--preset", help=f"a preset ({', '.join(GEOMETRIES)}), or a local Llama-layout model folder or its config.json")
    add("--model", help="the same as --preset (the trainer's name): a model folder or config.json, or a preset name")
    add("legacy_model", nargs="?", help=argparse.SUPPRESS)  # `plan llama-3-70b`: deprecated, use --preset
    add("--config", help="DeepSpeed JSON config: plans its ZeRO stage and offload (default: the preset's config)")
    add("--fsdp", action="store_true", help="plan FSDP2 instead of DeepSpeed")
    add("--cpu-offload", action="store_true", help="with --fsdp: FSDP2's CPU offload of parameters and optimizer")
    add("--strategy", choices=STRATEGIES, help="the planner's name for the engine, instead of --config / --fsdp")
    add("--quantization", default="none", choices=QUANTIZATIONS, help="base model loaded in 4 or 8 bits")
    add("--nodes", type=int, default=1, help="nodes in the job")
    add("--gpus-per-node", type=int, default=8, help="GPUs (training processes) per node")
    add("--micro-batch-size", type=int, help="examples per forward pass on each GPU (default: the preset's)")
    add("--seq-len", type=int, help="tokens per example (default: the preset's)")
    add("--r", type=int, help="adapter rank (default: the preset's)")
    add("--target-modules", nargs="+", default=["all-linear"], help="layer names to adapt (e.g. q_proj v_proj), or all-linear")
    add("--method", default="lorafa", choices=("lorafa", "lora"), help="lora: PEFT's LoRA, A trained too")
    add("--fast-adapter-rank", type=int,
        help="rows of A the job calibrates before step 0, 0..r (default: the preset's, r; 0 with --method lora)")
    add("--lora-dropout", type=float, help="dropout on the adapter input (default: the preset's, 0.05)")
    add("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="recompute activations in backward (default: the preset's)")
    add("--lean", action="store_true", help="lean mode (lorafa_scale.lean, launch/train.py's default)")
    add("--dtype", default="bfloat16", choices=tuple(DTYPE_NAMES), type=dtype_type("lorafa-scale plan"),
        help="base model dtype")
    add("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU")
    add("--reserve-gib", type=float, default=1.0, help="CUDA context, NCCL, fragmentation")
    add("--json", action="store_true", help="print the plan as JSON")
    add("--seed-table", action="store_true", help="print the seed card's memory table, computed (r 16, q_proj v_proj)")
    add_renamed(p, "--quant", "--quantization", choices=QUANTIZATIONS)
    add_renamed(p, "--micro-batch", "--micro-batch-size", type=int)
    add_renamed(p, "--targets", "--target-modules", convert=comma_list, note="--target-modules a b")
    return p


# the trainer's dtype names -> the planner's byte table
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _strategy(args, preset) -> str:
    """The planner's strategy from --strategy, --fsdp [--cpu-offload] or --config, else the preset's."""
    if args.strategy:
        return args.strategy
    if args.fsdp or (args.config is None and preset.strategy == "fsdp"):
        return "fsdp2-offload" if args.cpu_offload else "fsdp2"
    if args.config is None and preset.strategy == "single":
        return "single"
    from .launcher import REPO_ROOT, _planner_strategy

    config = Path(args.config) if args.config else REPO_ROOT / preset.deepspeed_config
    if not config.is_file():
        raise ConfigError(f"plan: --config: {config} not found")
    return _planner_strategy(config)


def job_from_args(args) -> Job:
    """The Job the options describe: the preset's settings, overridden by every option given."""
    from .presets import preset_from

    if args.legacy_model is not None:
        deprecated("lorafa-scale plan", f"the positional model ({args.legacy_model})", f"--preset {args.legacy_model}")
    name = args.preset or args.model or args.legacy_model
    if name is None:
        raise ConfigError("plan: --preset (or --model) is required unless --seed-table is given")
    load_geometry(name)  # a bad name fails here with the planner's message
    targets = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    try:
        preset = preset_from(name, micro_batch=args.micro_batch_size, seq_len=args.seq_len, r=args.r,
                             fast_adapter_rank=args.fast_adapter_rank, lora_dropout=args.lora_dropout,
                             gradient_checkpointing=args.gradient_checkpointing, target_modules=targets)
    except ConfigError as err:
        raise ConfigError(f"plan: {str(err).removeprefix('preset: ')}") from None
    return Job(preset.geometry, _strategy(args, preset), args.quantization, args.nodes, args.gpus_per_node,
               preset.micro_batch, preset.seq_len, preset.r, _targets(",".join(args.target_modules)), args.method,
               preset.lora_dropout, preset.gradient_checkpointing, DTYPE_NAMES[args.dtype], "cuda",
               args.gpu_memory_gib, args.reserve_gib, args.lean,
               # PEFT LoRA calibrates nothing; a rank given with it is refused by Job
               0 if args.method == "lora" and args.fast_adapter_rank is None else preset.fast_adapter_rank)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.seed_table:
            r = args.r or 16
            targets = _targets(",".join(args.target_modules) if args.target_modules != ["all-linear"] else "q_proj,v_proj")
            rows = seed_table(r, targets)
            print(json.dumps(rows, indent=2) if args.json else format_seed_table(rows, r, targets))
            return 0
        result = plan(job_from_args(args))
    except ConfigError as error:
        print(f"lorafa-scale {error}", file=sys.stderr)  # every message starts with "plan:"
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0 if result.fits else 1
