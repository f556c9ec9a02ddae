"""The package's size rules: no class over 200 lines of code and no function over 60, in
``mlflow_ema/`` and ``cli/``. Code lines only: docstrings, comments, blank lines and
decorators are free.

Run it as a script to list the largest: ``python tests/test_code_size.py``.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("mlflow_ema", "cli")
MAX_CLASS, MAX_FUNCTION = 200, 60


def code_lines(source: str) -> set[int]:
    """Line numbers holding code: not blank, not only a comment, not in a docstring."""
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            continue
        if token.type == tokenize.ENDMARKER:
            continue
        lines.update(range(token.start[0], token.end[0] + 1))
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                lines.difference_update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def sizes() -> list[tuple[int, int, str, str]]:
    """(code lines, limit, kind, "path:line name") of every class and function."""
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            source = path.read_text()
            code = code_lines(source)
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    start = node.lineno  # decorators sit above lineno: free
                    count = len([n for n in code if start <= n <= node.end_lineno])
                    kind, limit = (
                        ("class", MAX_CLASS) if isinstance(node, ast.ClassDef) else ("function", MAX_FUNCTION)
                    )
                    where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                    found.append((count, limit, kind, where))
    return found


def test_no_class_over_200_and_no_function_over_60_lines_of_code():
    over = [f"{kind} {where}: {count} > {limit}" for count, limit, kind, where in sizes() if count > limit]
    assert not over, "\n".join(over)


def test_lightning_uses_only_what_the_session_documents_for_it():
    """``mlflow_ema/lightning.py`` reaches the session only through ``LIGHTNING_API``."""
    from mlflow_ema.session import LIGHTNING_API

    tree = ast.parse((ROOT / "mlflow_ema" / "lightning.py").read_text())
    used = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "SESSION"
        ):
            used.add(node.attr)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
              and isinstance(node.value.value, ast.Name) and node.value.value.id == "SESSION"):  # fmt: skip
            used.add(f"{node.value.attr}.{node.attr}")
    used = {name.split(".")[0] if name.startswith("config.") else name for name in used}  # its options
    parts = {name for name in used if "." not in name and any(u.startswith(name + ".") for u in used)}
    assert used - parts <= LIGHTNING_API, sorted(used - parts - LIGHTNING_API)
    assert used, "the check found no use of SESSION: is it still named so?"


def test_torch_load_only_with_weights_only():
    """No pickle: every ``torch.load`` in the repository passes ``weights_only=True``."""
    unsafe = []
    for folder in (*FOLDERS, "tests", "examples", "benchmarks", "mlruns_fixtures"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):  # fmt: skip
                    safe = any(
                        k.arg == "weights_only" and getattr(k.value, "value", None) is True
                        for k in node.keywords
                    )
                    if not safe:
                        unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unsafe, unsafe


def test_the_counter_counts_code_only():
    source = (
        'def f():\n    """Doc\n    string."""\n    # comment\n\n    x = 1\n    return (x +\n            1)\n'
    )
    assert sorted(code_lines(source)) == [1, 6, 7, 8]


if __name__ == "__main__":
    rows = sorted(sizes(), reverse=True)
    for count, limit, kind, where in rows[: int(sys.argv[1]) if len(sys.argv) > 1 else 25]:
        flag = "  OVER" if count > limit else ""
        print(f"{count:5d} / {limit:3d}  {kind:8s} {where}{flag}")
