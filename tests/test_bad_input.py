"""Bad input to the CLI: one line on stderr, exit 1, and nothing created, changed or half-made."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest
from conftest import free_port
from helpers import run_cli
from mlflow import MlflowClient

MLFLOW_EMA = str(Path(sys.executable).parent / "mlflow-ema")
AVERAGE = ("average", "-e", "sweep", "--top-k", "2")


@pytest.fixture
def cli(small_sweep, tmp_path, monkeypatch):
    """The click app in-process on the shared sweep, in an empty working directory; the
    registry is emptied after each test."""
    _, uri = small_sweep
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EMA_TRUST_MODULES", "helpers")
    mlflow.set_tracking_uri(uri)

    yield run_cli
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    for run in soup_runs():
        client.delete_run(run.info.run_id)
    mlflow.set_tracking_uri(None)


def one_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mlflow-ema: error: "), output
    return lines[0]


def soup_runs(view: int = 1) -> list:
    """Soup runs of the sweep (in sweep-soups): active ones (view 1), or all, deleted ones too (view 3)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name("sweep-soups")
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id], "attributes.run_name LIKE 'soup-%'", run_view_type=view
    )


def run_command(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (stderr is not a terminal)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [MLFLOW_EMA, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# -- the tracking store ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "no-such-host.invalid:5000"])
def test_an_unreachable_server_fails_fast_in_one_line(tmp_path, host):
    """MLflow's own retry policy (minutes on a closed port) is left alone: the command
    checks first that the server answers at all."""
    uri = "http://" + host.format(port=free_port())
    done = run_command("--tracking-uri", uri, "ls", "-e", "sweep", cwd=tmp_path, timeout=60)
    assert done.returncode == 1
    line = one_error(done.stderr)
    assert f"cannot reach the tracking server at {uri}" in line
    assert ("connection refused" if "127.0.0.1" in host else "unknown host") in line


class _Busy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_busy_server_counts_as_answering():
    """429 / 503 answers are left to MLflow's retries: the pre-check passes."""
    from mlflow_ema.stores import check_server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_server(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    "args",
    [
        ("ls", "-e", "sweep"),
        ("average", "-e", "sweep", "--dry-run"),
        ("inspect", "models:/m-0123"),
        ("promote", "soup", "--version", "1"),
    ],
    ids=["ls", "average-dry-run", "inspect", "promote"],
)
def test_commands_never_create_a_store(tmp_path, args):
    uri = f"sqlite:///{tmp_path}/typo/mlflow.db"
    done = run_command("--tracking-uri", uri, *args, cwd=tmp_path)
    assert done.returncode == 1
    assert f"no MLflow store at {tmp_path}/typo/mlflow.db" in one_error(done.stderr)
    assert not (tmp_path / "typo").exists()
    if args[0] == "ls":  # the default store, ./mlflow.db, is not there either (one command is enough)
        done = run_command(*args, cwd=tmp_path)
        assert f"no MLflow store at {tmp_path}/mlflow.db" in one_error(done.stderr)
        assert not (tmp_path / "mlflow.db").exists()


# -- checked before any work or write ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--register-as", "soup", "--alias", "latest"], "invalid --alias 'latest'"),
        (["--register-as", "soup", "--alias", "v2"], "invalid --alias 'v2'"),
        (["--register-as", "soup", "--alias", "no spaces"], "invalid --alias 'no spaces'"),
        (["--register-as", "bad/name"], "invalid registered-model name 'bad/name'"),
        (["--register-as", "soup", "--model-kwargs", "{hidden: 16}"], "--model-kwargs is not valid JSON"),
        (["--register-as", "soup", "--model-kwargs", "[16]"], "--model-kwargs must be a JSON object"),
        (["--output", "."], "--output . already exists"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(cli, args, message):
    before = len(soup_runs())
    assert message in one_error(cli(*AVERAGE, *args, code=1))
    assert MlflowClient().search_registered_models() == []
    assert len(soup_runs()) == before


def test_an_output_under_a_file_is_refused_before_the_work(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "not a writable folder" in one_error(
        cli(*AVERAGE, "--output", str(tmp_path / "file" / "soup"), code=1)
    )


def _register(cli, alias: str = "candidate") -> str:
    out = json.loads(cli(*AVERAGE, "--eval", "helpers:digits_accuracy", "--register-as", "soup", "--alias", alias,
                         "--json"))  # fmt: skip
    return out["registered"]["version"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--copy-to", "bad/name"], "invalid --copy-to name 'bad/name'"),
        (["--to", "latest"], "invalid --to 'latest'"),
        (["--if-better", "../acc"], "invalid --if-better metric '../acc'"),
        (["--copy-to", "soup"], "--copy-to must name another registered model"),
    ],
)
def test_promote_checks_every_name_before_moving_anything(cli, args, message):
    _register(cli, "champion")
    second = _register(cli)
    assert message in one_error(cli("promote", "soup", "--from-alias", "candidate", *args, code=1))
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("soup", "champion").version) == "1"
    assert "mlflow_ema.promoted_to" not in client.get_model_version("soup", second).tags
    assert [m.name for m in client.search_registered_models()] == ["soup"]


# -- gates ---------------------------------------------------------------------------------------


def test_if_better_refuses_a_version_without_the_metric_even_with_no_holder(cli):
    cli(*AVERAGE, "--register-as", "soup", "--alias", "candidate")  # not scored: no ema/val_acc recorded
    line = one_error(
        cli("promote", "soup", "--from-alias", "candidate", "--if-better", "ema/val_acc", code=1)
    )
    assert "was not scored (averaged without --eval)" in line
    assert "champion" not in MlflowClient().get_registered_model("soup").aliases


def test_run_refuses_a_deleted_run_and_applies_status(cli):
    client = MlflowClient()
    (run,) = client.search_runs(
        [client.get_experiment_by_name("sweep").experiment_id], "attributes.run_name = 'b'"
    )
    run_id = run.info.run_id
    client.delete_run(run_id)
    try:
        assert "is deleted" in one_error(
            cli("average", "--run", run_id, "--top-k", "1", "--output", "o", code=1)
        )
    finally:
        client.restore_run(run_id)
    line = one_error(
        cli("average", "--run", run_id, "--status", "FAILED", "--top-k", "1", "--output", "o", code=1)
    )
    assert "is FINISHED, not FAILED" in line
    assert not Path("o").exists()


# -- nothing half-made ---------------------------------------------------------------------------


def test_a_failure_after_registering_removes_the_version_but_not_an_existing_model(cli, monkeypatch):
    _register(cli)

    def refuse(self, name, alias, version):
        raise RuntimeError("the registry went away")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refuse)
    line = one_error(cli(*AVERAGE, "--register-as", "soup", "--alias", "candidate", code=1))
    assert "deleted version 2" in line
    versions = MlflowClient().search_model_versions("name = 'soup'")
    assert [str(v.version) for v in versions] == ["1"]


# -- messages ------------------------------------------------------------------------------------


def test_a_shape_mismatch_names_the_tensors_and_both_shapes(cli):
    line = one_error(cli(*AVERAGE, "--register-as", "soup", "--model-factory", "helpers:make_net",
                         "--model-kwargs", '{"hidden": 8}', code=1))  # fmt: skip
    assert "'0.weight' is [16, 64] in the averaged weights but [8, 64] in the model" in line


def test_a_malformed_manifest_names_its_file(tmp_path, cli):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "mlflow-ema-checkpoint", "format_version": 2,
                                                      "kind": "ema", "files": ["model.safetensors"]}))  # fmt: skip
    line = one_error(cli("inspect", str(folder), code=1))
    assert str(folder / "manifest.json") in line and "files" in line


# -- stderr ---------------------------------------------------------------------------------------


def test_stderr_is_quiet_and_stdout_is_the_result(small_sweep, tmp_path):
    """Without a terminal: no progress, no MLflow download bar, no library chatter."""
    _, uri = small_sweep
    done = run_command(
        "--tracking-uri", uri, *AVERAGE, "--output", str(tmp_path / "soup"), "--json", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"] == str(tmp_path / "soup")
    assert done.stderr == ""
    model_id = json.loads(done.stdout)["members"][0]["model_id"]
    done = run_command("--tracking-uri", uri, "inspect", f"models:/{model_id}", cwd=tmp_path)
    assert done.returncode == 0 and "model.safetensors" in done.stdout
    assert done.stderr == ""
    done = run_command("--tracking-uri", uri, *AVERAGE, "--output", str(tmp_path / "soup2"), cwd=tmp_path)
    assert "downloading" not in done.stderr and "averaging" not in done.stderr
    assert done.stdout.startswith("averaged 2 checkpoints")


@pytest.mark.parametrize(
    "args",
    [("average", "--top-k", "0"), ("average", "--no-such-option"), ("promote",), ("ls", "--mode", "up")],
)
def test_usage_errors_are_one_line_too(tmp_path, args):
    done = run_command(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert "--help" in one_error(done.stderr)


def test_debug_shows_the_traceback(tmp_path):
    done = run_command(
        "--debug", "--tracking-uri", f"sqlite:///{tmp_path}/nope.db", "ls", "-e", "x", cwd=tmp_path
    )
    assert done.returncode == 1 and "Traceback" in done.stderr


def test_a_copied_store_in_another_directory_works(small_sweep, tmp_path):
    """Commands run from another directory against a store given by path."""
    folder, _ = small_sweep
    shutil.copy(folder / "mlflow.db", tmp_path / "copy.db")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_command("--tracking-uri", f"sqlite:///{tmp_path / 'copy.db'}", "ls", "-e", "sweep", "--json",
                       cwd=elsewhere)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [r["run_name"] for r in json.loads(done.stdout)] == ["a", "b"]
