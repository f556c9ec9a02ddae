"""Shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations


def print_verdicts(lines: list[tuple[str, bool]], *, quick: bool) -> int:
    """PASS/FAIL lines; the exit code is 1 if any failed. With ``--quick`` only the sanity
    checks count: a short run measures nothing worth a verdict."""
    failed = False
    for line, ok in lines:
        if quick and not line.startswith("sanity"):
            print(f"{'pass' if ok else 'fail'} (--quick: not a measurement): {line}")
            continue
        print(f"{'PASS' if ok else 'FAIL'}: {line}")
        failed |= not ok
    return 1 if failed else 0
