"""One decoder layer of Llama-2-13B and Llama-3-70B (plus full embeddings and head), bf16, under ZeRO-3 on 2
CPU processes: built partitioned, adapters on every linear layer, wrapped in an engine; the 13B slice also
takes one training step (the 70B step by hand: tests/workers/deepspeed_slice.py says how).

Memory heavy (up to 6 GB resident per rank, 2026-12-07): run it alone,
    python -m pytest -q tests/engines/test_deepspeed_slices.py
"""

from __future__ import annotations

import json
import math

import pytest

from lorafa_scale.jobs.presets import GEOMETRIES
from tests.engines.test_deepspeed import torchrun
from tests.workers import deepspeed_slice as worker

SLICES = ("llama-2-13b", "llama-3-70b")
TRAINED = ("llama-2-13b",)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("slices")
    trained = [arg for name in TRAINED for arg in ("--train", name)]
    torchrun(worker.__file__, "--out", out, *trained, *SLICES, timeout=600)
    return {name: json.loads((out / f"{name}.json").read_text()) for name in SLICES}


@pytest.mark.parametrize("name", SLICES)
def test_slice_is_partitioned(name, reports):
    report, geometry = reports[name], GEOMETRIES[name]
    hidden, vocab = geometry.hidden_size, geometry.vocab_size
    base = 2 * vocab * hidden + sum(i * o for i, o in geometry.linear_shapes().values()) + 3 * hidden
    sizes = [math.prod(shape) for shape in report["adapter_shapes"]]
    threshold = report["persistence_threshold"]
    assert len(sizes) == 2 * len(geometry.linear_shapes())
    assert report["parameters"] == base + sum(sizes)

    def held_by_one_rank(values: list[int]) -> float:
        """Half of each parameter (2 ranks), all of one at or below the persistence threshold."""
        return sum(v if v <= threshold else v / 2 for v in values)

    norms = [hidden] * 3
    assert report["held"] == pytest.approx(held_by_one_rank([base - 3 * hidden, *norms, *sizes]), abs=64)
    assert 0.49 < report["held"] / report["parameters"] < 0.51
    assert report["adapter_held"] == pytest.approx(held_by_one_rank(sizes), abs=64)
    if name in TRAINED:
        assert math.isfinite(report["loss"]) and report["b_norm"] > 0
    else:
        assert "loss" not in report
