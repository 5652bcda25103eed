"""The folder of a run started without --output-dir: a new one every time, runs/lorafa-YYYYmmdd-HHMMSS.

Every process of one launch must pick the same folder without talking to the others (the process group
does not exist yet). They agree on a key that only this launch has and on a time stamp:

- one process: its own pid and the current time;
- several processes on one node (torchrun, deepspeed, accelerate): the launcher that started them all,
  i.e. the parent process, its pid and its start time (from /proc, so Linux only).

Candidates are tried in a fixed order (runs/lorafa-STAMP, then -2, -3, ...). A folder is created whole
with a `.lorafa-launch` file holding the key (made under a temporary name, then renamed), so a process
that finds a candidate taken reads whose it is: its own launch's (another rank got there first) or another
run's (try the next name). Several nodes cannot share a key this way: they must be given --output-dir.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

from ..config import ConfigError

RUNS_ROOT = "runs"
PREFIX = "lorafa"
MARKER = ".lorafa-launch"
ENV_OUTPUT_DIR = "LORAFA_OUTPUT_DIR"  # job.sh sets it, so every node and every requeued attempt share one dir


def _parent_start() -> float:
    """Start time (seconds since the epoch) of the parent process, read from /proc."""
    ppid = os.getppid()
    stat = Path(f"/proc/{ppid}/stat").read_text()
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks after boot
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def launch_identity(world_size: int) -> tuple[str, float]:
    """(key, time stamp) shared by every process of this launch; ConfigError where none can be found."""
    host = socket.gethostname()
    if world_size <= 1:
        now = time.time()
        return f"{host} pid {os.getpid()} {now}", now
    local = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE"))  # torchrun / deepspeed
    if local is None or int(local) != world_size:
        raise ConfigError(f"{world_size} processes over several nodes (or an unknown launcher): pass "
                          "--output-dir, a folder every node sees")
    try:
        started = _parent_start()
    except (OSError, ValueError, IndexError, StopIteration):
        raise ConfigError(f"{world_size} processes: pass --output-dir (without /proc the processes cannot "
                          "agree on a new folder)") from None
    return f"{host} launcher {os.getppid()} {started}", started


def new_run_dir(world_size: int, root: str | os.PathLike = RUNS_ROOT) -> Path:
    """Create (or, for a later rank of the same launch, find) this launch's new run folder."""
    key, stamp = launch_identity(world_size)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = f"{PREFIX}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}"
    for n in range(1, 10_000):
        candidate = root / (base if n == 1 else f"{base}-{n}")
        if not candidate.exists():
            tmp = root / f".{candidate.name}.{os.getpid()}.tmp"
            tmp.mkdir()
            (tmp / MARKER).write_text(key + "\n")
            try:
                tmp.rename(candidate)  # fails when the name was taken in the meantime
                return candidate
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        try:
            if (candidate / MARKER).read_text().strip() == key:
                return candidate  # another process of this launch created it
        except OSError:
            pass
    raise ConfigError(f"no free run folder name {root}/{base}-N; pass --output-dir")


def is_unused(directory: Path) -> bool:
    """True if a folder made by new_run_dir holds nothing but its marker and the built-in base model."""
    return directory.is_dir() and all(p.name in (MARKER, "base_model") for p in directory.iterdir())
