"""A merged full-precision model from a base checkpoint and an adapter, one tensor in memory at a time.

    lorafa-scale merge out/adapter path/to/llama out/merged [--quantization nf4 --dtype bfloat16]

Merging into a quantized model in memory loses most of the adapter to re-quantization (see
quantization.merge_and_unload), and merging a full-precision model in memory needs the whole model in RAM
(70B in bf16: 140 GB), where other tools run out of memory. `export_merged` streams the base checkpoint
tensor by tensor instead, so the peak is about one tensor plus the adapter.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from . import peft_format
from .backends import find_backend
from .cli_args import Parser, dtype_type
from .config import ConfigError
from .hf_checkpoint import safetensors_files
from .quantization import QUANTIZATION_CHOICES, bnb_config, resolve_dtype


def _roundtrip(weight: torch.Tensor, quantization_config) -> torch.Tensor:
    """What `weight` becomes once loaded with quantization_config: quantized, then dequantized."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    if quantization_config.load_in_8bit:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, quant_type=quantization_config.bnb_4bit_quant_type,
            compress_statistics=quantization_config.bnb_4bit_use_double_quant,
            quant_storage=quantization_config.bnb_4bit_quant_storage,
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type=quantization_config.bnb_4bit_quant_type,
            compress_statistics=quantization_config.bnb_4bit_use_double_quant,
            quant_storage=quantization_config.bnb_4bit_quant_storage, module=layer,
        )
    layer.to("cpu")  # quantizes
    return find_backend(layer).dequantized_weight(layer)


def _read_header(path: Path) -> tuple[bytes, dict]:
    """A safetensors file's header: its raw bytes (with the 8-byte length) and the parsed JSON."""
    with open(path, "rb") as f:
        size = f.read(8)
        raw = f.read(int.from_bytes(size, "little"))
    return size + raw, json.loads(raw)


def _write_like(source: Path, target: Path, read, transform) -> None:
    """Write `source`'s tensors, each passed through `transform`, to `target`, one tensor in memory at a time.

    Merged tensors keep the base's dtypes and shapes (export_merged checks the shapes first), so the
    source header (names, dtypes, shapes and byte offsets) is valid as is: copy it, then write the tensors
    in offset order.
    """
    raw_header, header = _read_header(source)
    keys = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    with open(target, "wb") as out:
        out.write(raw_header)
        for key in keys:
            out.write(transform(key, read(key)).contiguous().view(-1).view(torch.uint8).numpy())


def export_merged(adapter_dir, base_dir, out_dir, *, quantization: str = "none",
                  dtype: torch.dtype | str = torch.bfloat16, double_quant: bool = True) -> Path:
    """Write base + adapter as a full-precision checkpoint in `out_dir`, one tensor in memory at a time.

    Every adapted weight W of the base safetensors checkpoint becomes W + s B A (in fp32, stored back in W's
    dtype) and tensors the adapter trains in full (modules_to_save, biases) are replaced; everything else is
    copied, shard by shard, in the base's own file layout. Given the quantization (and dtype, double_quant)
    the adapter was trained with, W is first replaced by what loading it that way gives (cast, quantized,
    dequantized), so the export computes what the quantized model plus adapter computed in training.
    out_dir must not exist yet; it appears only once complete.
    """
    adapter_dir, base_dir, out_dir = Path(adapter_dir), Path(base_dir), Path(out_dir)
    quantization_config = bnb_config(quantization, dtype, double_quant)
    dtype = resolve_dtype(dtype)
    config = peft_format.load_config(adapter_dir)
    adapter = peft_format.load_weights(adapter_dir)
    shards = [path.name for path in safetensors_files(base_dir)]
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; export_merged never overwrites")
    prefix = "base_model.model."
    pairs = {}  # base weight key -> (lora_A key, lora_B key)
    replaced = {}  # base key -> adapter key, for tensors trained in full
    for key in adapter:
        if key.endswith(".lora_A.weight"):
            module = key[len(prefix):-len(".lora_A.weight")]
            pairs[module + ".weight"] = (key, key.replace(".lora_A.", ".lora_B."))
        elif not key.endswith(".lora_B.weight"):
            replaced[key[len(prefix):]] = key
    base_shapes = {key: info.get("shape") for shard in shards for key, info in _read_header(base_dir / shard)[1].items()}
    missing = sorted((set(pairs) | set(replaced)) - set(base_shapes))
    if missing:
        raise peft_format.AdapterFormatError(f"{adapter_dir}: adapter tensors with no base weight in {base_dir}: {missing[:3]}")
    shapes = {key: [adapter[b].shape[0], adapter[a].shape[1]] for key, (a, b) in pairs.items()}
    shapes.update({key: list(adapter[name].shape) for key, name in replaced.items()})
    for key, shape in shapes.items():
        if shape != base_shapes[key]:
            raise peft_format.AdapterFormatError(
                f"{adapter_dir}: {key} is {shape} in the adapter but {base_shapes[key]} in {base_dir}"
            )

    def merged(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if key in pairs:
            a_key, b_key = pairs[key]
            base = _roundtrip(tensor.to(dtype), quantization_config) if quantization_config else tensor
            delta = (adapter[b_key].float() @ adapter[a_key].float()) * config.scaling
            return (base.float() + delta).to(tensor.dtype)
        if key in replaced:
            return adapter[replaced[key]].to(tensor.dtype)
        return tensor

    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    for shard in shards:
        with safe_open(str(base_dir / shard), framework="pt") as reader:
            _write_like(base_dir / shard, tmp_dir / shard, reader.get_tensor, merged)
    for extra in base_dir.iterdir():  # config, index, tokenizer, generation config
        if extra.is_file() and not extra.name.endswith(".safetensors"):
            shutil.copy2(extra, tmp_dir / extra.name)
    os.replace(tmp_dir, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="lorafa-scale merge", description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="adapter directory (PEFT format)")
    parser.add_argument("base", help="the base model's directory (safetensors checkpoint)")
    parser.add_argument("output", help="new directory for the merged model (must not exist)")
    parser.add_argument("--quantization", default="none", choices=QUANTIZATION_CHOICES,
                        help="merge onto the weights as the adapter saw them in training (quantized, dequantized)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                        type=dtype_type(parser.prog),
                        help="the dtype the base was loaded in for training (with --quantization)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="the 4-bit base was quantized without double quantization")
    args = parser.parse_args(argv)
    try:
        out = export_merged(args.adapter, args.base, args.output, quantization=args.quantization,
                            dtype=args.dtype, double_quant=args.double_quant)
    except (ConfigError, peft_format.AdapterFormatError, FileExistsError, FileNotFoundError) as err:
        print(f"lorafa-scale merge: error: {err}", file=sys.stderr)
        return 2
    print(f"lorafa-scale: merged model written to {out}")
    return 0
