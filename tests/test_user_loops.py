"""Training loops as users write them, under plain ``mlflow_ema.autolog()`` (issue 13, item 2):
``torch.compile``, bf16 autocast, fp16 with ``GradScaler`` (skipped steps), gradient
accumulation, gradient clipping, several param groups, frozen layers. Each checks that the
checkpoints hold the model's own tensor names (no wrapper prefixes) and that the EMA counts
the optimizer steps that really ran, and no other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch
from helpers import logged_models
from torch import nn

import mlflow_ema


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


def batches(digits, n: int, size: int = 32):
    x, y = digits
    for i in range(n):
        idx = torch.randint(0, len(x), (size,), generator=torch.Generator().manual_seed(i))
        yield x[idx], y[idx]


def plain(model, opt, digits):
    for xb, yb in batches(digits, 8):
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


def bf16_autocast(model, opt, digits):
    for xb, yb in batches(digits, 8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


def fp16_grad_scaler(model, opt, digits):
    scaler = torch.amp.GradScaler("cpu")
    for i, (xb, yb) in enumerate(batches(digits, 8)):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(xb), yb)
        if i in (2, 5):
            loss = loss * float("inf")  # an overflow: the scaler skips this step
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def accumulation(model, opt, digits):
    opt.zero_grad()
    for i, (xb, yb) in enumerate(batches(digits, 12)):
        (nn.functional.cross_entropy(model(xb), yb) / 3).backward()
        if i % 3 == 2:
            opt.step()
            opt.zero_grad()


def clipping(model, opt, digits):
    for xb, yb in batches(digits, 8):
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
        opt.step()


def two_groups(model):
    return torch.optim.AdamW([
        {"params": model.body.parameters(), "lr": 1e-3},
        {"params": model.head.parameters(), "lr": 1e-2, "weight_decay": 0.0},
    ])  # fmt: skip


LOOPS = {
    "bf16-autocast": (bf16_autocast, lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
    "fp16-grad-scaler": (fp16_grad_scaler, lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
    "accumulation": (accumulation, lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
    "clipping": (clipping, lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
    "param-groups": (plain, lambda m: two_groups(m)),
    "frozen-layers": (plain, None),
}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_users_loop_checkpoints_the_models_own_names_and_counts_real_steps(tracking, digits, loop):
    train, make_optimizer = LOOPS[loop]
    model = Net()
    if make_optimizer is None:  # frozen layers: the optimizer sees the head only
        for p in model.body.parameters():
            p.requires_grad_(False)
        opt = torch.optim.SGD(filter(lambda p: p.requires_grad, model.parameters()), lr=0.1)
    else:
        opt = make_optimizer(model)
    frozen = {k: v.clone() for k, v in model.body.state_dict().items()}
    real_steps = []
    opt.register_step_post_hook(lambda *_: real_steps.append(1))
    mlflow_ema.autolog()
    with mlflow.start_run() as run:
        train(model, opt, digits)
        ema = mlflow_ema.get_ema(model)
    expected = {"fp16-grad-scaler": 6, "accumulation": 4}.get(loop, 8)
    assert len(real_steps) == expected  # the loop's own count: skipped steps do not run
    assert ema.step == ema.num_updates == expected
    checkpoints = {m.tags["mlflow_ema.kind"]: m for m in logged_models(run.info.run_id)}
    assert set(checkpoints) == {"raw", "ema"} and checkpoints["ema"].tags["mlflow_ema.step"] == str(expected)
    weights = mlflow_ema.load_state_dict(f"models:/{checkpoints['ema'].model_id}")
    assert sorted(weights) == sorted(model.state_dict())  # body.0.weight...: no wrapper prefix
    if loop == "frozen-layers":  # a frozen layer's average is the layer
        assert all(torch.equal(weights[f"body.{k}"], v) for k, v in frozen.items())
        assert not torch.equal(weights["head.weight"], model.head.weight)


COMPILED = """
import json

import mlflow
import torch
from sklearn.datasets import load_digits
from torch import nn

import mlflow_ema


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.body(x))


x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
mlflow_ema.autolog()
model = torch.compile(Net())  # the user keeps only the compiled module
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
with mlflow.start_run() as run:
    for i in range(6):
        idx = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(i))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ema = mlflow_ema.get_ema(model)
    steps = [ema.step, ema.num_updates]
client = mlflow.MlflowClient()
models = mlflow.search_logged_models(filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list",
                                     experiment_ids=[run.info.experiment_id])
ema_model = next(m for m in models if m.tags["mlflow_ema.kind"] == "ema")
names = list(mlflow_ema.load_state_dict(f"models:/{ema_model.model_id}"))
files = [a.path for a in client.list_artifacts(run.info.run_id, "mlflow_ema/architecture")]
print(json.dumps({"steps": steps, "names": names, "files": files,
                  "status": client.get_run(run.info.run_id).info.status}))
"""


def test_torch_compile_under_autolog(tmp_path):
    """In a subprocess (compiling leaves dynamo state behind); about 20 s to compile."""
    (tmp_path / "train.py").write_text(COMPILED)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "FINISHED" and result["steps"] == [6, 6]
    assert sorted(result["names"]) == [
        "body.0.bias",
        "body.0.weight",
        "head.bias",
        "head.weight",
    ]  # no _orig_mod.
    assert "mlflow_ema/architecture/program.pt2" in result["files"]
    assert "mlflow-ema:" not in done.stderr, done.stderr[-2000:]  # no warning: nothing went wrong
