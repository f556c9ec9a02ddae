"""The README's Python blocks run as written (issue 13, item 6), so the docs cannot drift
from the code.

A block marked with ``<!-- runnable -->`` (or ``<!-- runnable: SETUP -->``) on the line
before its opening fence is run in a fresh process, in an empty folder with the default
store (``sqlite:///mlflow.db``), after a prelude that defines what the README's blocks take
as the reader's own (``build_model``, ``model``, ``optimizer``, ``loader``, ``loss_fn``,
``evaluate``, ``epochs``: a small network on scikit-learn's digits) and the named SETUP's
code; then the SETUP's checks run. Unmarked blocks are fragments (an option, one call)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKED = re.compile(r"<!-- runnable(?:: (?P<setup>[\w-]+))? -->\n```python\n(?P<code>.*?)```", re.S)

PRELUDE = """
import mlflow
import torch
import mlflow_ema
from sklearn.datasets import load_digits
from torch import nn

X, Y = load_digits(return_X_y=True)
X, Y = torch.tensor(X / 16, dtype=torch.float32), torch.tensor(Y)


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


model = build_model()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:256], Y[:256]), batch_size=64)
loss_fn = nn.functional.cross_entropy
epochs = 2


@torch.no_grad()
def evaluate(m):
    return (m(X[1500:]).argmax(1) == Y[1500:]).float().mean().item()
"""

# What a block needs beyond the prelude, and what must hold after it.
SETUPS = {
    None: ("", ""),
    "continued": ("", ""),  # runs after the block marked before it, in the same process
    # the "### Lightning" section's blocks, run in order (with their checks) by
    # tests/test_lightning.py::test_the_readmes_lightning_snippets_run_as_written
    "lightning": None,
    "autolog": (
        "",
        """
(run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
assert sorted(m.name for m in models if m.status.name == "READY") == ["ema-step8", "raw-step8"], models
history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "ema/val_acc")
assert len(history) == epochs, history
""",
    ),
    "posthoc": (
        "",
        """
experiment = mlflow.get_run(run.info.run_id).info.experiment_id
models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
names = sorted(m.name for m in models if m.tags.get("mlflow_ema.kind") == "posthoc")
assert names == sorted(f"posthoc{s}-step{n}" for s in ("0_05", "0_1") for n in (4, 8)), names
(plan,) = result.reconstructions
assert plan.step == 8 and abs(sum(c for _, c in plan.coefficients) - 1) < 1e-9 and plan.output == "ema-0.08"
""",
    ),
    "resume": (
        """
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
total_steps = 20
mlflow_ema.autolog(checkpoint_every_n_steps=3, log_training_state=True)
batches = list(loader)
with mlflow.start_run() as killed:  # the job that was killed (here it ends at step 7)
    for step in range(7):
        x, y = batches[step % len(batches)]
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
killed_run_id = killed.info.run_id
model = build_model()  # the new process builds them again
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
""",
        "assert start == 7, start\nassert scheduler.last_epoch == 7, scheduler.last_epoch\n",
    ),
}


def marked_blocks() -> list[tuple[str | None, str, int]]:
    """(setup, code, line) of each marked block; a ``continued`` block's code starts with the
    code of the block before it."""
    text, blocks = README.read_text(), []
    for m in MARKED.finditer(text):
        code = (blocks[-1][1] if m["setup"] == "continued" and blocks else "") + m["code"]
        blocks.append((m["setup"], code, text[: m.start()].count("\n") + 2))
    return blocks


def test_the_readme_marks_its_runnable_blocks():
    blocks = marked_blocks()
    python = README.read_text().count("```python\n")
    assert len(blocks) == python, "every Python block of the README is marked <!-- runnable -->"
    assert {setup for setup, _, _ in blocks} <= set(SETUPS), [s for s, _, _ in blocks]


@pytest.mark.parametrize(
    ("setup", "code", "line"),
    [block for block in marked_blocks() if SETUPS.get(block[0]) is not None],
    ids=lambda v: f"line{v}" if isinstance(v, int) else None,
)
def test_a_readme_block_runs_as_written(tmp_path, setup, code, line):
    before, checks = SETUPS[setup]
    script = "\n".join([PRELUDE, textwrap.dedent(before), f"# README.md line {line}", code, checks])
    (tmp_path / "block.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    done = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.returncode == 0, f"README.md line {line}:\n{done.stderr[-3000:]}"
