"""Issue 13, item 4: a run SIGKILLed mid-way and resumed ends bit-identical to an
uninterrupted one (raw weights, EMA, learning rate) with each of torch's schedulers,
stepped per step and per epoch.

``train_schedulers.py`` is the user's script. Two processes train every case side by side
(two stores, two cores), each case in fresh forked children: one the uninterrupted runs,
the other the killed runs, each resumed in a new process once it died.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_schedulers import CASES, killed_run_id

SCRIPT = Path(__file__).parent / "train_schedulers.py"


def phase(mode: str, out: Path, store: Path, cases: list[str]) -> subprocess.Popen:
    env = {
        **{k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"},  # another store's id
        "PYTHONPATH": str(Path(__file__).parent),
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), mode, str(out), *cases],
        cwd=store.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its forked children too are killed if it hangs
    )


def finish(proc: subprocess.Popen) -> None:
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    """Trains every case in two processes side by side: the uninterrupted runs (store A),
    and the killed runs, each resumed right after it died (store B)."""
    root = tmp_path_factory.mktemp("resume-matrix")
    out = root / "out"
    out.mkdir()
    for store in "AB":
        (root / store).mkdir()
    full = phase("full", out, root / "A" / "mlflow.db", list(CASES))
    killed = phase("killed", out, root / "B" / "mlflow.db", list(CASES))
    finish(killed)
    finish(full)
    return out


def result(out: Path, name: str, mode: str) -> dict:
    status = (out / f"{name}-{mode}.status").read_text()
    log = out / f"{name}-{mode}.log"
    assert status == "exit 0", f"{name} {mode}: {status}\n{log.read_text()[-3000:]}"
    return torch.load(out / f"{name}-{mode}.pt", weights_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_a_killed_run_resumes_bit_for_bit(matrix, name):
    case = CASES[name]
    status = (matrix / f"{name}-killed.status").read_text()
    assert status == f"signal {int(signal.SIGKILL)}", (matrix / f"{name}-killed.log").read_text()[-3000:]
    full, resumed = result(matrix, name, "full"), result(matrix, name, "resume")
    assert resumed["run_id"] == killed_run_id(matrix, name)  # logged into the killed run
    assert resumed["start"] == case.kill // case.every * case.every  # its last checkpoint
    assert len({*resumed["lrs"].values(), *resumed["lr"]}) > 1  # the lr changes after the resume
    assert resumed["lr"] == full["lr"]
    assert resumed["lrs"] == {s: lr for s, lr in full["lrs"].items() if s >= resumed["start"]}
    for kind in ("raw", "ema"):
        assert full[kind].keys() == resumed[kind].keys()
        for key, value in full[kind].items():
            assert torch.equal(resumed[kind][key], value), (kind, key)
    if name == "StepLR-50-checkpoint-every-50":  # resumed from step 100, where the lr halved
        assert resumed["lrs"][100] == 0.0025 and resumed["lr"] == [0.00125]
