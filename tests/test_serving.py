"""Issue 12's "done when", as a user would do it: a sweep trained under plain ``autolog()``
with the model class defined in the training script, averaged and registered from another
directory, then loaded, predicted with and served in fresh processes elsewhere, with no
user code, no ``PYTHONPATH`` and no pickle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

MLFLOW_EMA = str(Path(sys.executable).with_name("mlflow-ema"))
MLFLOW = str(Path(sys.executable).with_name("mlflow"))

TRAIN = """
import mlflow, torch, mlflow_ema
from torch import nn
from sklearn.datasets import load_digits


class DigitsNet(nn.Module):  # defined here, in __main__: nothing can import it later
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x))


x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)
mlflow.set_experiment("sweep")
mlflow_ema.autolog()
torch.manual_seed(0)
init = DigitsNet().state_dict()
for lr in (0.05, 0.1, 0.2):
    model = DigitsNet()
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with mlflow.start_run():
        for step in range(40):
            i = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(step))
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad(); loss.backward(); opt.step()
        with mlflow_ema.swap(model), torch.no_grad():
            model.eval()
            mlflow.log_metric("val_acc", (model(x[1000:]).argmax(1) == y[1000:]).float().mean().item())
"""

# A fresh process elsewhere: the registered version, and the soup's weights applied by hand.
LOAD = """
import json, sys, mlflow, torch, mlflow_ema
from torch.nn import functional as F

x = torch.tensor(json.load(open("x.json")), dtype=torch.float32)
loaded = mlflow.pytorch.load_model("models:/digits-soup@candidate")
w = mlflow_ema.load_state_dict("models:/digits-soup@candidate")
h = F.linear(x, w["features.0.weight"], w["features.0.bias"])
h = F.batch_norm(h, w["features.1.running_mean"], w["features.1.running_var"], w["features.1.weight"],
                 w["features.1.bias"], training=False, eps=1e-5)
expected = F.linear(F.relu(h), w["head.weight"], w["head.bias"])
ours = mlflow_ema.load_model("models:/digits-soup@candidate")
json.dump({"loaded": loaded(x).tolist(), "expected": expected.tolist(), "ours": ours(x).tolist(),
           "type": type(loaded).__name__}, open("out.json", "w"))
"""


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def registered(tmp_path_factory, digits):
    """Train in one folder, register from another; returns (env, store folder, inputs)."""
    root = tmp_path_factory.mktemp("serving")
    train, elsewhere = root / "train", root / "elsewhere"
    train.mkdir()
    elsewhere.mkdir()
    (train / "train.py").write_text(TRAIN)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_EMA_TRUST_MODULES")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{train / 'mlflow.db'}"
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # an activated venv: uvicorn
    )
    _run([sys.executable, "train.py"], train, env)
    done = _run([MLFLOW_EMA, "average", "-e", "sweep", "--top-k", "3", "--register-as", "digits-soup",
                 "--alias", "candidate"], elsewhere, env)  # fmt: skip
    assert "registered digits-soup version 1" in done.stdout
    assert "pickle" not in done.stderr.lower()
    return env, root, digits[0][:16].numpy()


def test_the_registered_version_loads_anywhere_without_user_code_or_pickle(registered):
    env, root, x = registered
    far = root / "far"
    far.mkdir()
    (far / "x.json").write_text(json.dumps(x.tolist()))
    (far / "load.py").write_text(LOAD)
    _run([sys.executable, "load.py"], far, {**env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    out = json.loads((far / "out.json").read_text())
    np.testing.assert_allclose(out["loaded"], out["expected"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["ours"], out["expected"], rtol=1e-5, atol=1e-5)
    assert out["type"] != "DigitsNet"  # a program: the class exists nowhere but in train.py


def test_the_registered_files_hold_no_pickle_and_have_a_signature(registered, tmp_path):
    import mlflow

    from mlflow_ema.programs import check_pickle_free

    env, _, _ = registered
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        folder = Path(
            mlflow.artifacts.download_artifacts("models:/digits-soup@candidate", dst_path=str(tmp_path))
        )
    finally:
        mlflow.set_tracking_uri(None)
    names = {p.name for p in folder.rglob("*") if p.is_file()}
    assert "model.pt2" in names and "input_example.json" in names
    assert not names & {"model.pth", "pickle_module_info.txt"}, names
    check_pickle_free(folder / "data" / "model.pt2")
    mlmodel = (folder / "MLmodel").read_text()
    assert "signature:" in mlmodel and '"shape": [-1, 64]' in mlmodel, mlmodel
    example = json.loads((folder / "input_example.json").read_text())
    assert np.asarray(example).shape == (2, 64)  # synthetic values of the captured shape, batch 2


def test_mlflow_models_predict_and_serve_return_the_soups_outputs(registered, tmp_path):
    env, _, x = registered
    expected = _expected(env["MLFLOW_TRACKING_URI"], x)
    (tmp_path / "in.json").write_text(json.dumps({"inputs": x.tolist()}))
    _run([MLFLOW, "models", "predict", "-m", "models:/digits-soup@candidate", "--env-manager", "local",
          "-i", "in.json", "-t", "json", "-o", "out.json"], tmp_path, env)  # fmt: skip
    np.testing.assert_allclose(
        _predictions((tmp_path / "out.json").read_text()), expected, rtol=1e-5, atol=1e-5
    )

    port = free_port()
    server = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", "models:/digits-soup@candidate", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        body = _post(port, json.dumps({"inputs": x.tolist()}).encode(), server)
    finally:
        server.terminate()
        server.wait(timeout=30)
    np.testing.assert_allclose(_predictions(body), expected, rtol=1e-5, atol=1e-5)


def _expected(uri: str, x: np.ndarray) -> np.ndarray:
    """The soup's weights applied by hand (the class exists only in train.py)."""
    import mlflow
    import torch
    from torch.nn import functional as F

    import mlflow_ema

    mlflow.set_tracking_uri(uri)
    try:
        w = mlflow_ema.load_state_dict("models:/digits-soup@candidate")
    finally:
        mlflow.set_tracking_uri(None)
    h = F.linear(torch.from_numpy(x), w["features.0.weight"], w["features.0.bias"])
    h = F.batch_norm(h, w["features.1.running_mean"], w["features.1.running_var"], w["features.1.weight"],
                     w["features.1.bias"], training=False, eps=1e-5)  # fmt: skip
    return F.linear(F.relu(h), w["head.weight"], w["head.bias"]).numpy()


def _predictions(text: str) -> list:
    data = json.loads(text)
    return data["predictions"] if isinstance(data, dict) else data


def _post(port: int, body: bytes, server: subprocess.Popen, wait: float = 90) -> str:
    """POST /invocations once the server answers /ping."""
    deadline = time.monotonic() + wait
    while True:
        assert server.poll() is None, "mlflow models serve exited"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=60).read().decode()
