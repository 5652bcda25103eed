"""The weight files of a Hugging Face model directory (safetensors only)."""

from __future__ import annotations

import json
from pathlib import Path


def safetensors_files(directory) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names, in a stable order."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                                "(lorafa-scale reads safetensors checkpoints only)")
    return [single]
