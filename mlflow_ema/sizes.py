"""Sizes of files: ``max_shard_size`` (the CLI reads it too, so no torch here)."""

from __future__ import annotations

import decimal
import re

DEFAULT_MAX_SHARD_SIZE = "5GB"  # the Hugging Face default (5 * 10**9 bytes)
_SIZE_UNITS = {
    "B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip


def parse_size(size: int | str | None) -> int | None:
    """``max_shard_size`` in bytes: an int, or a string such as ``"5GB"`` (10**9, as Hugging
    Face), ``"500MB"`` or ``"2GiB"`` (2**30). None (never shard) stays None."""
    if size is None:
        return None
    value = None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if match and (match.group(2) or "B") in _SIZE_UNITS:
            value = int(decimal.Decimal(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"])
    if value is None or value < 1:
        raise ValueError(
            f"max_shard_size must be a positive number of bytes or a size such as '5GB', '500MB' or '2GiB' "
            f"(units {', '.join(_SIZE_UNITS)}), got {size!r}"
        )
    return value
