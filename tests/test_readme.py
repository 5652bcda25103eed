"""README's Python API snippet runs as written, on a tiny model saved locally in place of path/to/llama."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.tiny_models import save_tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_snippet_runs(tmp_path, monkeypatch):
    save_tiny_llama(tmp_path / "llama")
    code = python_block_after("## The Python API")
    assert "base = " in code.split("PeftModel.from_pretrained(base")[0]  # every name it uses is defined
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code.replace("path/to/llama", str(tmp_path / "llama")), "README.md", "exec"), namespace)
    merged, model = namespace["merged"], namespace["model"]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.arange(8)[None]
    assert merged(ids).logits.shape == (1, 8, 128) and model is not None


def test_the_fast_adaptation_snippet_runs(tmp_path):
    save_tiny_llama(tmp_path / "llama")
    code = python_block_after("### Fast adaptation: calibrated rows of A")
    ids = torch.randint(0, 128, (6, 2, 16), generator=torch.Generator().manual_seed(0))
    namespace = {"train_dataloader": [{"input_ids": x, "labels": x} for x in ids]}  # what the snippet assumes
    exec(compile(code.replace("path/to/llama", str(tmp_path / "llama")), "README.md", "exec"), namespace)
    report = namespace["report"]
    assert (report.layers, report.fast_rows, report.batches) == (14, 16, 4)
    assert str(report).startswith("calibrated 16 fast rows of A in 14 layers from 4 batches")
    assert namespace["model"].fast_rows_calibrated
