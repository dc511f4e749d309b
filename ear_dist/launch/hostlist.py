"""Slurm hostlist expressions ("node[1-3,7],gpu-a[01-02]") expanded to host names.

Slurm passes node lists to jobs in this compressed form (SLURM_JOB_NODELIST).
``scontrol show hostnames`` expands them where Slurm's client tools exist;
``expand_hostlist`` is the pure-Python equivalent for everywhere else, and
``parse_tasks_per_node`` expands the matching "2(x3),1" task counts.
"""

from __future__ import annotations

import itertools
import re


class HostlistError(ValueError):
    """A hostlist or tasks-per-node expression that does not parse."""


def _split_top_level(expression: str) -> list[str]:
    """Split on the commas that are outside brackets."""
    items, depth, start = [], 0, 0
    for index, char in enumerate(expression):
        if char == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"nested '[' at position {index} in hostlist {expression!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unmatched ']' at position {index} in hostlist {expression!r}")
        elif char == "," and depth == 0:
            items.append(expression[start:index])
            start = index + 1
    if depth != 0:
        raise HostlistError(f"unclosed '[' in hostlist {expression!r}")
    items.append(expression[start:])
    return items


def _expand_range_set(range_set: str, expression: str) -> list[str]:
    """'1-3,07' -> ['1', '2', '3', '07']; numbers keep the lower bound's zero padding."""
    values = []
    for part in range_set.split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise HostlistError(
                f"bad range {part!r} in hostlist {expression!r}: expected N or N-M with digits")
        if not sep:
            values.append(low)
            continue
        if int(high) < int(low):
            raise HostlistError(f"range {part!r} in hostlist {expression!r} runs backwards")
        width = len(low)
        values.extend(str(number).zfill(width) for number in range(int(low), int(high) + 1))
    return values


def _expand_item(item: str, expression: str) -> list[str]:
    # Literal text and bracket groups alternate; several groups ("rack[1-2]-n[1-2]")
    # expand as a cartesian product, first group outermost, as Slurm does.
    pieces = re.split(r"(\[[^\]]*\])", item)
    choices = []
    for piece in pieces:
        if piece.startswith("["):
            choices.append(_expand_range_set(piece[1:-1], expression))
        elif piece:
            choices.append([piece])
    return ["".join(combo) for combo in itertools.product(*choices)]


def expand_hostlist(expression: str) -> list[str]:
    """Expand a Slurm hostlist expression into host names, in Slurm's order.

    >>> expand_hostlist("node[1-3,7],gpu-a[01-02]")
    ['node1', 'node2', 'node3', 'node7', 'gpu-a01', 'gpu-a02']

    Several bracket groups in one name expand as a product, first group
    outermost. Text after a bracket group ("a[1-2]b") is accepted, though Slurm
    22.05 itself rejects it. Raises HostlistError naming the bad part.
    """
    expression = expression.strip()
    if not expression:
        return []
    hosts = []
    for item in _split_top_level(expression):
        item = item.strip()
        if item:  # Slurm skips empty items ("a,,b")
            hosts.extend(_expand_item(item, expression))
    return hosts


def parse_tasks_per_node(expression: str) -> list[int]:
    """Expand Slurm's tasks-per-node form: "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in expression.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise HostlistError(
                f"bad tasks-per-node part {part!r} in {expression!r}: expected N or N(xM)")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts
