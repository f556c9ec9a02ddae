"""Nothing runs because of what a tracking server holds: a callable a run recorded is
imported only from modules the person running the command trusts."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import yaml
from helpers import run_cli
from mlflow import MlflowClient

from mlflow_ema import AverageOptions, MlflowEmaError, average_runs

FACTORY = "mlflow_ema.model_factory"
KWARGS = "mlflow_ema.model_kwargs"


@pytest.fixture(scope="module")
def store(small_sweep):
    return small_sweep


@pytest.fixture
def cli(store, tmp_path, monkeypatch):
    """The click app in-process, in an empty working directory; run tags restored after."""
    _, uri = store
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EMA_TRUST_MODULES", raising=False)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    saved = {r.info.run_id: dict(r.data.tags) for r in runs}

    yield run_cli
    for run_id, tags in saved.items():
        for key in (FACTORY, KWARGS, "mlflow_ema.model_class", "mlflow_ema.model_hparams"):
            if key in tags:
                client.set_tag(run_id, key, tags[key])
            else:
                with contextlib.suppress(Exception):
                    client.delete_tag(run_id, key)
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    mlflow.set_tracking_uri(None)


def tamper(tags: dict[str, str]) -> None:
    """What anyone with access to an unauthenticated server can do: rewrite the runs' tags."""
    client = MlflowClient()
    for run in client.search_runs([client.get_experiment_by_name("sweep").experiment_id]):
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, value)


def one_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mlflow-ema: error: "), output
    return lines[0]


# The runs also recorded their architecture program, which needs no code: --serialization pickle
# takes the path that imports a recorded factory (as --update-bn does, and runs without a program).
AVERAGE = ("average", "-e", "sweep", "--top-k", "2", "--register-as", "soup", "--serialization", "pickle")


@pytest.mark.parametrize(
    "tags",
    [
        {FACTORY: "os:system", KWARGS: json.dumps({"command": "touch PWNED"})},
        {FACTORY: "subprocess:run", KWARGS: json.dumps({"args": ["touch", "PWNED"]})},
        {
            "mlflow_ema.model_class": "os:system",
            "mlflow_ema.model_hparams": json.dumps({"command": "touch PWNED"}),
        },
    ],
    ids=["os.system", "subprocess.run", "model_class"],
)
def test_a_callable_named_by_a_tag_is_never_run(cli, tmp_path, tags):
    if "mlflow_ema.model_class" in tags:
        tamper({FACTORY: ""})  # no factory: the LightningModule path
    tamper(tags)
    line = one_error(cli(*AVERAGE, code=1))
    spec = tags.get(FACTORY) or tags["mlflow_ema.model_class"]
    assert "recorded" in line and repr(spec) in line and "only if you trust it" in line
    assert "run " in line and "--model-factory" in line
    assert "--trust-module os" not in line and "--trust-module subprocess" not in line  # never that advice
    assert "is the standard library, which --trust-module never covers" in line
    assert not (tmp_path / "PWNED").exists()
    assert MlflowClient().search_registered_models() == []


def test_the_refusal_comes_before_any_download(cli, store):
    folder, _ = store
    tamper({FACTORY: "os:system"})
    artifacts = next((folder / "mlruns").rglob("model.safetensors")).parent
    hidden = artifacts.with_name("hidden")
    artifacts.rename(hidden)  # a download would fail first, with another message
    try:
        assert "only if you trust it" in one_error(cli(*AVERAGE, code=1))
    finally:
        hidden.rename(artifacts)


@pytest.mark.parametrize("prefix", ["os", "subprocess", "importlib.util"])
def test_the_standard_library_is_never_trusted(cli, tmp_path, prefix):
    tamper({FACTORY: "subprocess:run", KWARGS: json.dumps({"args": ["touch", "PWNED"]})})
    assert "the standard library builds no models" in one_error(
        cli(*AVERAGE, "--trust-module", prefix, code=1)
    )
    assert not (tmp_path / "PWNED").exists()


def test_a_recorded_factory_that_builds_no_module_is_refused(cli, tmp_path):
    (tmp_path / "teamfactory.py").write_text("def make(hidden):\n    return hidden\n")
    tamper({FACTORY: "teamfactory:make"})
    line = one_error(cli(*AVERAGE, "--trust-module", "teamfactory", code=1))
    assert "teamfactory:make(**{'hidden': 16}) returned a int, not a torch module" in line


def test_a_name_a_trusted_module_imported_is_refused(cli, tmp_path, monkeypatch):
    package = tmp_path / "teamcode"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text("from subprocess import run\n")
    tamper({FACTORY: "teamcode.models:run", KWARGS: json.dumps({"args": ["touch", "PWNED"]})})
    line = one_error(cli(*AVERAGE, "--trust-module", "teamcode", code=1))
    assert "defined in module 'subprocess'" in line and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    ("spec", "trust", "expected"),
    [
        ("helpers_evil:make_net", "helpers", "--trust-module helpers_evil"),  # a prefix at a dot boundary
        ("helpers:torch.hub.load", "helpers", "one name after ':'"),  # no walking into other packages
        ("__main__:Net", "helpers", "defined in the training script"),
    ],
)
def test_prefixes_match_at_dot_boundaries_and_one_name_follows_the_colon(
    cli, tmp_path, spec, trust, expected
):
    (tmp_path / "helpers_evil.py").write_text("open('IMPORTED', 'w').close()\ndef make_net(**kw): pass\n")
    tamper({FACTORY: spec})
    assert expected in one_error(cli(*AVERAGE, "--trust-module", trust, code=1))
    assert not (tmp_path / "IMPORTED").exists()


def test_a_module_in_the_working_directory_is_not_imported_unless_trusted(cli, tmp_path):
    (tmp_path / "localmod.py").write_text("open('IMPORTED', 'w').close()\ndef build(**kw): pass\n")
    tamper({FACTORY: "localmod:build"})
    one_error(cli(*AVERAGE, code=1))
    assert not (tmp_path / "IMPORTED").exists()
    assert str(tmp_path) not in sys.path


def test_each_way_of_trusting_registers(cli, tmp_path, monkeypatch):
    cli(*AVERAGE, "--trust-module", "helpers")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"trust_module": ["helpers"]}))
    cli(*AVERAGE, "--config", str(tmp_path / "c.yaml"))
    monkeypatch.setenv("MLFLOW_EMA_TRUST_MODULES", "other, helpers")
    cli(*AVERAGE)
    versions = MlflowClient().search_model_versions("name = 'soup'")
    assert len(versions) == 3


def test_a_factory_the_user_gives_needs_no_trust(cli):
    tamper({FACTORY: "os:system"})
    out = json.loads(cli(*AVERAGE, "--model-factory", "helpers:make_net", "--model-kwargs", '{"hidden": 16}',
                         "--json"))  # fmt: skip
    assert out["registered"]["version"] == "1"


@pytest.mark.parametrize(
    "extra",
    [["--serialization", "pickle", "--register-as", "soup"], ["--update-bn", "helpers:digits_loader"]],
)
def test_every_path_that_rebuilds_the_model_checks_trust(cli, tmp_path, extra):
    tamper({FACTORY: "os:system", KWARGS: json.dumps({"command": "touch PWNED"})})
    args = ("average", "-e", "sweep", "--top-k", "2", "--output", str(tmp_path / "soup"), *extra)
    assert "only if you trust it" in one_error(cli(*args, code=1))
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "soup").exists()


def test_the_python_api_checks_trust(cli, tmp_path, monkeypatch):
    tamper({FACTORY: "os:system", KWARGS: json.dumps({"command": "touch PWNED"})})
    options = AverageOptions(experiments=["sweep"], top_k=2, register_as="soup", serialization="pickle")
    with pytest.raises(MlflowEmaError, match="only if you trust it"):
        average_runs(options)
    assert not (tmp_path / "PWNED").exists()
    tamper({FACTORY: "helpers:make_net", KWARGS: json.dumps({"hidden": 16})})
    result = average_runs(
        AverageOptions(experiments=["sweep"], top_k=2, register_as="soup", trust_modules=["helpers"],
                       serialization="pickle")
    )  # fmt: skip
    assert result.registered.version == "1"


def test_with_the_recorded_program_no_recorded_callable_is_even_looked_at(cli, tmp_path):
    """The default path (the architecture program) imports nothing a run names."""
    tamper({FACTORY: "os:system", KWARGS: json.dumps({"command": "touch PWNED"})})
    out = json.loads(cli("average", "-e", "sweep", "--top-k", "2", "--register-as", "soup",
                         "--eval", "helpers:digits_accuracy", "--json"))  # fmt: skip
    assert out["registered"]["version"] == "1" and not (tmp_path / "PWNED").exists()


def test_the_model_is_rebuilt_once_per_command(cli, tmp_path):
    (tmp_path / "counted.py").write_text(
        textwrap.dedent(
            """
            from helpers import make_net
            def build(hidden):
                with open("BUILDS", "a") as f:
                    f.write("built\\n")
                return make_net(hidden=hidden)
            """
        )
    )
    tamper({FACTORY: "counted:build"})
    cli("average", "-e", "sweep", "--top-k", "2", "--strategy", "greedy", "--eval", "helpers:digits_accuracy",
        "--update-bn", "helpers:digits_loader", "--register-as", "soup", "--trust-module", "counted")  # fmt: skip
    assert (tmp_path / "BUILDS").read_text().splitlines() == ["built"]


def test_a_bad_trust_prefix_is_refused(cli):
    assert "dotted module names" in one_error(cli(*AVERAGE, "--trust-module", "", code=1))
    assert "dotted module names" in one_error(cli(*AVERAGE, "--trust-module", "a-b", code=1))


def test_os_system_is_not_run_by_the_installed_command(store, tmp_path):
    """The console script as a user runs it, from another directory."""
    _, uri = store
    mlflow.set_tracking_uri(uri)
    try:
        tamper({FACTORY: "os:system", KWARGS: json.dumps({"command": f"touch {tmp_path / 'PWNED'}"})})
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_EMA_")}
        done = subprocess.run(
            [str(Path(sys.executable).parent / "mlflow-ema"), "--tracking-uri", uri, *AVERAGE],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr
        one_error(done.stderr)
        assert done.stdout == "" and not (tmp_path / "PWNED").exists()
    finally:
        tamper({FACTORY: "helpers:make_net", KWARGS: json.dumps({"hidden": 16})})
        mlflow.set_tracking_uri(None)
