"""Slurm host lists ("gpu[01-03,07],login1") expanded to host names, as `scontrol show hostnames` does.

Standard library only, so launch/slurm/node.sh can run this file directly (`python hostlist.py NODELIST`,
one name per line) where scontrol is missing, without importing torch.
"""

from __future__ import annotations

import re
import sys


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list, in order: "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1;
    "r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2. A malformed list raises ValueError naming it."""
    item_pattern = r"(?:[^,\[\]]|\[[^\[\]]*\])+"  # names and [ranges], up to a comma outside brackets
    if not re.fullmatch(rf"{item_pattern}(?:,{item_pattern})*", nodelist):
        raise ValueError(f"node list '{nodelist}' is not a Slurm host list such as gpu[01-04],cpu7")
    hosts = []
    for item in re.findall(item_pattern, nodelist):
        names = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            suffixes = [text]
            if ranges:
                suffixes = [text + n for part in ranges.split(",") for n in _expand_range(part, nodelist)]
            names = [name + suffix for name in names for suffix in suffixes]
        hosts += names
    return hosts


def _expand_range(part: str, nodelist: str) -> list[str]:
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
        raise ValueError(f"node list '{nodelist}': bad range '{part}'")
    first, last = match.group(1), match.group(2) or match.group(1)
    return [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]


if __name__ == "__main__":
    try:
        print("\n".join(expand_nodelist(sys.argv[1])))
    except (IndexError, ValueError) as err:
        sys.exit(f"hostlist.py: {err if isinstance(err, ValueError) else 'usage: hostlist.py NODELIST'}")
