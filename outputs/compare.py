"""How an int8 figure compares with its fp32 one, written the same way everywhere (the report,
the status page, the testbed's table). Standard library only: the status page imports it.

- size and latency: how many times smaller/faster, one decimal: "3.5x smaller", "2.6x faster"
  (or "1.3x larger", "1.2x slower" when int8 loses);
- accuracy: the change in percentage points, "-0.30 pp";
- loss: the plain difference, "+0.0100".

Each returns None when a figure is missing (or a ratio is undefined): the caller shows its own
placeholder.
"""
from __future__ import annotations

import math


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _times(fp32, int8, lower_word, higher_word):
    if not (_number(fp32) and _number(int8)) or fp32 <= 0 or int8 <= 0:
        return None
    if fp32 >= int8:
        return f"{fp32 / int8:.1f}x {lower_word}"
    return f"{int8 / fp32:.1f}x {higher_word}"


def size(fp32, int8) -> str | None:
    """Model size in bytes: size(4096, 1024) == "4.0x smaller"."""
    return _times(fp32, int8, "smaller", "larger")


def latency(fp32, int8) -> str | None:
    """Latency in any unit: latency(6.6, 2.2) == "3.0x faster"; latency(1.2, 3.6) == "3.0x slower"."""
    return _times(fp32, int8, "faster", "slower")


def point_change(fp32, int8) -> str | None:
    """Accuracy (fractions) as a change in percentage points: point_change(0.955, 0.952) == "-0.30 pp"."""
    if not (_number(fp32) and _number(int8)):
        return None
    return f"{round(100 * (int8 - fp32), 2) + 0.0:+.2f} pp"  # + 0.0: no "-0.00" for a tiny loss


def difference(fp32, int8) -> str | None:
    """Loss as a plain difference, int8 minus fp32: difference(0.15, 0.16) == "+0.0100"."""
    if not (_number(fp32) and _number(int8)):
        return None
    return f"{int8 - fp32:+.4f}"
