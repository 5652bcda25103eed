"""Resumable checkpoints in <output-dir>/checkpoints/step-N/, written so that a kill at any instant is safe.

Every rank writes into checkpoints/.step-N.tmp/ (the strategy's files plus its own RNG states); once all
ranks are done, rank 0 renames it to step-N. A rename is atomic, so a directory named step-N is always
complete and `latest` never sees half a checkpoint. Old checkpoints are pruned (--keep-last) only after
the new one is in place, and are renamed away before being deleted for the same reason.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import torch

from ..engines.strategy import Strategy

CHECKPOINTS_DIR = "checkpoints"
STEP_DIR = re.compile(r"step-(\d+)")
RNG_NAME = "rng_state_rank{rank}.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the directory."""


def complete_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """[(step, directory)] of the complete checkpoints under output_dir, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.fullmatch(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def check_resumable(directory, world_size: int) -> None:
    """Fail before any model is loaded if `directory` is not a checkpoint this job can resume."""
    directory = Path(directory)
    for rank in range(world_size):
        if not (directory / RNG_NAME.format(rank=rank)).is_file():
            written_by = len(list(directory.glob(RNG_NAME.format(rank="*"))))
            raise CheckpointError(
                f"{directory}: not a checkpoint for {world_size} process(es) "
                f"(has RNG states of {written_by}); resume with the same number of processes"
            )


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove(path: Path) -> None:
    """Delete a directory by first renaming it to a hidden name, so a kill midway leaves no step-N behind."""
    doomed = path.with_name(f".{path.name}.deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    path.rename(doomed)
    shutil.rmtree(doomed)


def save_checkpoint(strategy: Strategy, output_dir, step: int, client_state: dict, keep_last: int) -> Path:
    """Collective: write checkpoints/step-<step>/ atomically, then prune to the newest keep_last."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step}"
    if final.is_dir():  # already saved at this step (e.g. a periodic save just before the end)
        return final
    tmp = root / f".step-{step}.tmp"
    if strategy.is_main():
        if tmp.exists():  # left by a run killed while saving
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    strategy.barrier()
    strategy.save_checkpoint(tmp, client_state)
    torch.save(_rng_state(), tmp / RNG_NAME.format(rank=strategy.rank))
    strategy.barrier()
    if strategy.is_main():
        tmp.rename(final)
        for _, old in complete_checkpoints(output_dir)[:-keep_last]:
            _remove(old)
    strategy.barrier()
    return final


def load_checkpoint(strategy: Strategy, directory) -> dict:
    """Collective: restore the strategy's state and this rank's RNG states; return the client state."""
    directory = Path(directory)
    client_state = strategy.load_checkpoint(directory)
    _set_rng_state(torch.load(directory / RNG_NAME.format(rank=strategy.rank), weights_only=True))
    return client_state
