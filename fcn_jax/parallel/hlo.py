"""Reading collectives out of compiled HLO text (communication assertions)."""

from __future__ import annotations

import re

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")

# `%name = f32[2,8,16]{...} all-gather(...)`, also the async `-start` forms used on GPU
_INSTR = re.compile(r"=\s*(?P<shape>[^=]*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """How many of each collective the compiled program contains."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for m in _INSTR.finditer(hlo_text):
        counts[m.group("op")] += 1
    return counts


def collective_shapes(hlo_text: str, op: str) -> list[str]:
    """Result shapes (text) of every instance of collective ``op``."""
    return [m.group("shape") for m in _INSTR.finditer(hlo_text) if m.group("op") == op]
