"""The model's architecture recorded in training (``torch.export`` at the first checkpoint):
what is stored, registering soups without the user's code, the fallbacks when a model does
not export, that capture leaves training alone, and that a stored program is data, never
code. Plain training loops on scikit-learn's digits, a real sqlite store, no mocks."""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import logged_models, run_cli
from mlflow import MlflowClient
from torch import nn

import mlflow_ema
from mlflow_ema import CheckpointError
from mlflow_ema.programs import check_pickle_free, load_program

ARCH = "mlflow_ema/architecture"


# -- the user's code -------------------------------------------------------------------------------


class Masked(nn.Module):
    """A forward with a keyword argument, called as ``model(x, mask=m)``."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        return self.fc2(torch.relu(self.fc1(x)))


class DictNet(nn.Module):
    """A forward taking one dict, called as ``model({"pixels": x, "mask": m})``."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, batch: dict):
        return self.fc2(torch.relu(self.fc1(batch["pixels"] * batch["mask"])))


class Regularized(nn.Module):
    """Dropout (random state) and BatchNorm (train/eval behaviour)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


BRANCHY = '''
import torch
from torch import nn


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it."""

    def __init__(self, hidden=16):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:
            h = h * 2
        return self.fc2(h)


def make_branchy(hidden=16):
    torch.manual_seed(0)
    return Branchy(hidden)
'''


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def batches(digits, steps: int, batch: int = 32):
    x, y = digits
    for i in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=torch.Generator().manual_seed(i))
        yield x[idx], y[idx]


def fit(model, optimizer, digits, steps: int, call=None, after_step=None) -> None:
    """The user's loop: ``call(model, x)`` is how their forward is called."""
    call = call or (lambda m, xb: m(xb))
    model.train()
    for xb, yb in batches(digits, steps):
        loss = nn.functional.cross_entropy(call(model, xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()


def listed(run_id: str, path: str = ARCH) -> set[str]:
    return {a.path.rsplit("/", 1)[-1] for a in MlflowClient().list_artifacts(run_id, path)}


def one_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mlflow-ema: error: "), output
    return lines[0]


def ours(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("mlflow-ema:")]


@pytest.fixture
def registry(tracking):
    yield tracking
    client = MlflowClient()
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)


# -- 1. a forward with keyword arguments or a dict -------------------------------------------------

TRAIN_SCRIPT = """
import mlflow
import torch
from sklearn.datasets import load_digits
from torch import nn

import mlflow_ema

{classes}

def main():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    mlflow_ema.autolog()
    calls = {{
        "masked": (Masked, lambda m, xb: m(xb, mask=(xb > 0).float())),
        "dict": (DictNet, lambda m, xb: m({{"pixels": xb, "mask": (xb > 0).float()}})),
    }}
    for experiment, (cls, call) in calls.items():
        mlflow.set_experiment(experiment)
        for name, lr in (("a", 0.1), ("b", 0.05)):
            torch.manual_seed(0)
            model = cls()
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            with mlflow.start_run(run_name=name):
                for i in range(5):
                    idx = torch.randint(0, len(x), (32,), generator=torch.Generator().manual_seed(i))
                    loss = nn.functional.cross_entropy(call(model, x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                mlflow.log_metric("ema/val_acc", lr)


if __name__ == "__main__":
    main()
"""

# how the user calls each model, and the same inputs as positional tensors in leaf order
CALLS = {
    "masked": (Masked, lambda m, x, k: m(x, mask=k), lambda x, k: (x, k)),
    "dict": (DictNet, lambda m, x, k: m({"pixels": x, "mask": k}), lambda x, k: (x, k)),
}


@pytest.fixture(scope="module")
def kwargs_sweep(tmp_path_factory):
    """Experiments ``masked`` and ``dict``, two runs each, trained by a script whose model
    classes live in its ``__main__`` (not importable here)."""
    folder = tmp_path_factory.mktemp("kwargs-sweep")
    classes = "\n\n".join(textwrap.dedent(inspect.getsource(c)) for c in (Masked, DictNet))
    (folder / "train.py").write_text(TRAIN_SCRIPT.format(classes=classes))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "train.py"], cwd=folder, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mlflow-ema:" not in done.stderr, done.stderr[-3000:]  # no warning: both exported
    return folder, uri


@pytest.fixture
def kwargs_store(kwargs_sweep, tmp_path, monkeypatch):
    _, uri = kwargs_sweep
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    client = MlflowClient()
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    mlflow.set_tracking_uri(None)


def sample(rows: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(rows, 64, generator=torch.Generator().manual_seed(5))
    return x, (x > 0.5).float()


@pytest.mark.parametrize("experiment", ["masked", "dict"])
def test_a_forward_with_kwargs_or_a_dict_is_recorded_and_its_checkpoints_load_without_the_code(
    kwargs_store, experiment
):
    cls, call, _ = CALLS[experiment]
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 2
    for run in runs:
        assert listed(run.info.run_id) == {"inputs.json", "program.pt2"}
        assert "mlflow_ema.architecture_error" not in run.data.tags
        inputs = json.loads(
            mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{ARCH}/inputs.json")  # the recorded call
        )
        assert [leaf["shape"] for leaf in inputs["leaves"]] == [[32, 64], [32, 64]]
        assert inputs["model_class"] == f"__main__:{cls.__name__}" and not inputs["real_example"]
    x, mask = sample(7)  # another batch size than in training: the batch dimension is dynamic
    for checkpoint in logged_models(runs[0].info.run_id):
        uri = f"models:/{checkpoint.model_id}"
        loaded = mlflow_ema.load_model(uri)
        reference = cls()
        reference.load_state_dict(mlflow_ema.load_state_dict(uri))
        with torch.no_grad():
            torch.testing.assert_close(
                call(loaded, x, mask), call(reference.eval(), x, mask), rtol=0, atol=1e-6
            )
        assert not loaded.training


@pytest.mark.parametrize(
    "experiment",
    [
        "masked",
        "dict",
    ],
)
def test_a_soup_of_a_kwargs_or_dict_forward_registers_and_loads_without_the_code(kwargs_store, experiment):
    cls, call, positional = CALLS[experiment]
    name = f"{experiment}-soup"
    out = json.loads(run_cli("average", "-e", experiment, "--top-k", "2", "--register-as", name, "--json"))
    assert out["registered"]["version"] == "1"
    uri = f"models:/{name}/1"
    reference = cls()
    reference.load_state_dict(mlflow_ema.load_state_dict(uri))
    x, mask = sample(7)
    with torch.no_grad():
        expected = call(reference.eval(), x, mask)
        by_mlflow = mlflow.pytorch.load_model(uri)(*positional(x, mask))
        by_us = mlflow_ema.load_model(uri)(*positional(x, mask))
    torch.testing.assert_close(by_mlflow, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_us, expected, rtol=0, atol=1e-6)


# -- 2. a model torch.export cannot trace ----------------------------------------------------------


@pytest.fixture
def branchy(tracking, tmp_path, monkeypatch, request):
    """The user's module ``branchy_models`` in the working directory (importable, like a
    project's own package), imported as their training script would."""
    (tmp_path / "branchy_models.py").write_text(BRANCHY)
    monkeypatch.syspath_prepend(str(tmp_path))
    request.addfinalizer(lambda: sys.modules.pop("branchy_models", None))
    return importlib.import_module("branchy_models")


def test_a_model_that_does_not_export_warns_once_and_registers_as_a_pickle_with_a_factory(
    branchy, registry, digits
):
    mlflow.set_experiment("branchy")
    mlflow_ema.autolog(checkpoint_every_n_steps=2)
    run_ids = []
    for name, lr in (("a", 0.1), ("b", 0.05)):
        model = branchy.make_branchy()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mlflow.start_run(run_name=name) as run:
                fit(model, opt, digits, 6)  # checkpoints at steps 2, 4 and 6
                mlflow.log_metric("ema/val_acc", lr)
        run_ids.append(run.info.run_id)
        [warning] = ours(caught)  # once per model, not once per checkpoint
        assert "Branchy (module branchy_models)" in warning and "model_factory=" in warning
        assert "torch.export failed" in warning
        assert len(logged_models(run.info.run_id)) == 6
        tag = mlflow.get_run(run.info.run_id).data.tags["mlflow_ema.architecture_error"]
        assert tag.startswith("Branchy: torch.export failed")
        assert listed(run.info.run_id) == {"inputs.json"}  # what the forward takes, no program

    average = ("average", "-e", "branchy", "--top-k", "2", "--register-as", "branchy-soup")
    line = one_error(run_cli(*average, code=1))
    assert "--model-factory" in line and "recorded no architecture program" in line
    assert MlflowClient().search_registered_models() == []

    out = run_cli(*average, "--model-factory", "branchy_models:make_branchy")
    assert "warning: the model cannot be registered in the pt2 format" in out and "as a pickle" in out
    uri = "models:/branchy-soup/1"
    with pytest.raises(CheckpointError, match=r"is a pickle .*pass allow_pickle=True"):
        mlflow_ema.load_model(uri)
    loaded = mlflow_ema.load_model(uri, allow_pickle=True)
    reference = branchy.make_branchy()
    reference.load_state_dict(mlflow_ema.load_state_dict(uri))
    x, _ = digits
    with torch.no_grad():
        assert torch.equal(loaded(x[:50]), reference.eval()(x[:50]))


# -- 3. input examples -----------------------------------------------------------------------------


@pytest.mark.parametrize("real", [True, False], ids=["log_input_examples", "default"])
def test_the_registered_input_example_is_real_rows_only_when_asked(registry, digits, tmp_path, real):
    from safetensors.torch import load_file

    mlflow.set_experiment("examples")
    mlflow_ema.autolog(log_input_examples=real)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with mlflow.start_run() as run:
        fit(model, opt, digits, 3)
        mlflow.log_metric("ema/val_acc", 0.5)
    files = listed(run.info.run_id)
    assert files == {"inputs.json", "program.pt2"} | ({"input_example.safetensors"} if real else set())
    inputs = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{ARCH}/inputs.json"))
    assert inputs["real_example"] is real

    run_cli("average", "-e", "examples", "--top-k", "1", "--register-as", "examples")
    source = MlflowClient().get_model_version("examples", "1").source
    folder = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / "version")))
    example = torch.tensor(json.loads((folder / "input_example.json").read_text()), dtype=torch.float32)
    assert example.shape[1:] == (64,)
    fed = [xb for xb, _ in batches(digits, 3)]
    if real:
        stored = load_file(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path=f"{ARCH}/input_example.safetensors",
                dst_path=str(tmp_path / "stored"),
            )
        )  # fmt: skip
        assert list(stored) == ["input_0"] and torch.equal(example, stored["input_0"])
        assert len(example) == 5 and any(torch.equal(example, xb[:5]) for xb in fed)  # a batch's first rows
    else:
        x, _ = digits
        assert not (example[:, None, :] == x[None]).all(-1).any()  # no row of the data
        assert example.min() < 0  # standard normal values, not pixels in [0, 1]


# -- 4. capture does not change training -----------------------------------------------------------


def test_capture_leaves_training_bit_identical_with_dropout_and_batchnorm(tracking, digits):
    def train() -> tuple[dict, list[bool]]:
        torch.manual_seed(0)
        model = Regularized()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        modes = []

        def check_modes():
            modes.append(all(m.training for m in model.modules()))

        torch.manual_seed(1)  # the dropout masks' random state
        fit(model, opt, digits, 6, after_step=check_modes)
        return {k: v.clone() for k, v in model.state_dict().items()}, modes

    plain, _ = train()
    mlflow_ema.autolog(checkpoint_every_n_steps=2)  # the export runs at step 2, mid-training
    with mlflow.start_run() as run:
        captured, modes = train()
    assert listed(run.info.run_id) == {"inputs.json", "program.pt2"}
    assert modes == [True] * 6  # train mode restored on every submodule after the export
    assert plain.keys() == captured.keys()
    assert all(torch.equal(plain[k], captured[k]) for k in plain), [
        k for k in plain if not torch.equal(plain[k], captured[k])
    ]


# -- 5. a program is data, never code --------------------------------------------------------------


def evil_pickle(target: Path) -> bytes:
    """A protocol-0 pickle naming ``os.system``: unpickling it runs ``touch target``."""
    return f"cos\nsystem\n(S'touch {target}'\ntR.".encode()


def rewrite(
    archive: bytes, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None
) -> bytes:
    """A zip like ``archive``, records ending with a key of ``replace`` replaced, ``add``'s
    records added under its top folder."""
    replace, add = replace or {}, add or {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        top = src.namelist()[0].split("/", 1)[0]
        for info in src.infolist():
            new = next((v for k, v in replace.items() if info.filename.endswith(k)), None)
            dst.writestr(info.filename, src.read(info) if new is None else new)
        for name, data in add.items():
            dst.writestr(f"{top}/{name}", data)
    return out.getvalue()


def record(archive: bytes, suffix: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(suffix)))


def weights_config(archive: bytes, edit) -> bytes:
    config = json.loads(record(archive, "data/weights/model_weights_config.json"))
    edit(config["config"])
    return json.dumps(config).encode()


def craft(archive: bytes, how: str, target: Path) -> tuple[bytes, str]:
    """``archive`` made to run ``touch target`` when ``torch.export.load`` reads it; and the
    record a refusal must name."""
    evil = evil_pickle(target)
    sample_inputs = record(archive, "data/sample_inputs/model.pt")  # a torch.save zip
    pickled = weights_config(archive, lambda c: c["0.weight"].update(use_pickle=True))
    replace: dict[str, bytes] = {"model_weights_config.json": pickled, "weights/weight_0": evil}
    add: dict[str, bytes] = {}
    name = "data/weights/weight_0"
    if how == "sample-inputs":  # the torch.save zip's data.pkl names os.system
        replace = {"data/sample_inputs/model.pt": rewrite(sample_inputs, {"data.pkl": evil})}
        name = "data/sample_inputs/model.pt"
    elif how == "added-record":
        replace, add, name = {}, {"data/extra.pkl": evil}, "data/extra.pkl"
    elif how == "pickle-before-zip":  # a legacy torch.save pickle, a harmless torch.save zip appended
        replace = {"data/sample_inputs/model.pt": evil + sample_inputs}
        name = "data/sample_inputs/model.pt"
    elif how == "decoy-config":  # another *_config.json, which torch never reads, says weight_0 is raw
        decoy = {"config": {"d": {"path_name": "weight_0", "use_pickle": False}}}
        add = {"data/weights/decoy_weights_config.json": json.dumps(decoy).encode()}
    elif how == "two-entries":  # weight_0 is raw for one entry of the config, a pickle for another

        def edit(c: dict) -> None:
            entries = dict(c)
            c.clear()
            c.update({"evil": {**entries["0.weight"], "use_pickle": True}, **entries})

        replace["model_weights_config.json"] = weights_config(archive, edit)
    else:
        assert how == "pickled-weight", how  # the config says weight_0 is a pickle: it is checked
    return rewrite(archive, replace, add), name


def real_archive(path: Path) -> bytes:
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(4, 64),)), path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "how",
    [
        "sample-inputs",
        "added-record",
        "pickled-weight",
        "pickle-before-zip",
        "decoy-config",
        "two-entries",
    ],
)  # fmt: skip
def test_an_archive_that_would_unpickle_code_is_refused_before_torch_reads_it(tmp_path, how):
    target = tmp_path / "PWNED"
    crafted, name = craft(real_archive(tmp_path / "real.pt2"), how, target)
    path = tmp_path / "program.pt2"
    path.write_bytes(crafted)
    with pytest.raises(CheckpointError, match=rf"record '[^']*{name}' is not plain data"):
        check_pickle_free(path)
    with pytest.raises(CheckpointError, match="is not plain data"):
        load_program(path)  # the check runs first: torch.export.load never sees it
    assert not target.exists()


def test_a_real_program_passes_the_check(tmp_path):
    real_archive(tmp_path / "real.pt2")
    check_pickle_free(tmp_path / "real.pt2")
    assert load_program(tmp_path / "real.pt2")(torch.randn(4, 64)).shape == (4, 10)


def one_checkpointed_run(experiment: str, digits) -> str:
    """A watched MLP trained 3 steps in ``experiment``, one checkpoint with a metric; its run id."""
    mlflow.set_experiment(experiment)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mlflow_ema.watch(model, opt)
    with mlflow.start_run() as run:
        fit(model, opt, digits, 3)
        mlflow_ema.log_checkpoint(metrics={"ema/val_acc": 0.5})
    return run.info.run_id


def test_a_runs_program_replaced_by_a_crafted_archive_is_never_loaded(registry, digits, tmp_path):
    run_id = one_checkpointed_run("secure", digits)
    ema = logged_models(run_id)[0]
    assert ema.tags["mlflow_ema.kind"] == "ema"
    uri = f"models:/{ema.model_id}"
    mlflow_ema.load_model(uri)  # the recorded program loads

    real = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{ARCH}/program.pt2",
                                               dst_path=str(tmp_path / "real"))  # fmt: skip
    target = tmp_path / "PWNED"
    crafted, _ = craft(Path(real).read_bytes(), "sample-inputs", target)
    (tmp_path / "crafted").mkdir()
    (tmp_path / "crafted" / "program.pt2").write_bytes(crafted)
    MlflowClient().log_artifact(
        run_id, str(tmp_path / "crafted" / "program.pt2"), ARCH
    )  # what a server may hold

    with pytest.raises(CheckpointError, match=r"sample_inputs/model\.pt' is not plain data"):
        mlflow_ema.load_model(uri)
    line = one_error(run_cli("average", "-e", "secure", "--top-k", "1", "--register-as", "secure", code=1))
    assert "is not plain data" in line and "refusing to load a program" in line
    assert not target.exists()
    assert MlflowClient().search_registered_models() == []


@pytest.mark.parametrize(
    "content", ["{not json", '{"format_version": 1, "leaves": [{"shape": [-1], "dtype": "os"}]}']
)
def test_a_malformed_inputs_json_is_refused_in_one_line(registry, digits, tmp_path, content):
    run_id = one_checkpointed_run("malformed", digits)
    (tmp_path / "inputs.json").write_text(content)
    MlflowClient().log_artifact(run_id, str(tmp_path / "inputs.json"), ARCH)
    line = one_error(run_cli("average", "-e", "malformed", "--top-k", "1", "--register-as", "m", code=1))
    assert f"run {run_id}: its recorded architecture is unreadable (inputs.json: " in line
    assert MlflowClient().search_registered_models() == []


# -- 6. a named model ------------------------------------------------------------------------------


def test_a_model_watched_with_a_name_records_its_own_architecture_folder(tracking, digits):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mlflow_ema.watch(model, opt, name="G")
    with mlflow.start_run() as run:
        fit(model, opt, digits, 3)
        mlflow_ema.log_checkpoint()
    assert {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "mlflow_ema")} >= {
        "mlflow_ema/G-architecture"
    }
    assert listed(run.info.run_id) == set()  # no unnamed folder
    assert listed(run.info.run_id, "mlflow_ema/G-architecture") == {"inputs.json", "program.pt2"}
    for checkpoint in logged_models(run.info.run_id):
        uri = f"models:/{checkpoint.model_id}"
        assert checkpoint.name.startswith("G-")
        reference = mlp()
        reference.load_state_dict(mlflow_ema.load_state_dict(uri))
        x = torch.rand(9, 64)
        with torch.no_grad():
            torch.testing.assert_close(mlflow_ema.load_model(uri)(x), reference(x), rtol=0, atol=1e-6)


# -- a model whose forward mlflow-ema never sees ---------------------------------------------------


@pytest.mark.parametrize(
    "last_checkpoint",
    [
        False,
        True,
    ],
    ids=["run-end-checkpoint", "log_checkpoint-at-the-last-step"],
)  # fmt: skip
def test_a_forward_never_seen_warns_and_tags_the_run(tracking, digits, last_checkpoint):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mlflow_ema.watch(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mlflow.start_run() as run:
            fit(model, opt, digits, 3, call=lambda m, xb: m.forward(xb))  # no hooks run
            if last_checkpoint:
                mlflow_ema.log_checkpoint(metrics={"ema/val_acc": 0.5})
    [warning] = ours(caught)
    assert "Sequential" in warning and "model_factory=" in warning and "no forward call" in warning
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert "no forward call" in tags.get("mlflow_ema.architecture_error", "")


# -- 7. torch.compile: tests/test_user_loops.py::test_torch_compile_under_autolog checks the program too
