"""``mlflow-ema ls / average / promote / inspect`` on a real sweep in a real sqlite store."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import make_net, run_cli, train_steps
from mlflow import MlflowClient

import mlflow_ema
from mlflow_ema import load_checkpoint
from mlflow_ema.tracking import _SESSION

NOT_NAN = "attributes.run_name != 'nan'"


def _sweep_run(digits, name, lr, values, *, seed=0, hidden=16, fail=False, metric="ema/val_acc", nan=False):
    """One run fine-tuned from the seed's init: a checkpoint per value, linked to it."""
    model = make_net(seed=seed, hidden=hidden)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mlflow_ema.watch(model, opt, model_factory="helpers:make_net", model_kwargs={"hidden": hidden})
    try:
        with mlflow.start_run(run_name=name):
            for i, value in enumerate(values):
                train_steps(model, opt, digits, 5, start=5 * i)
                if nan and i == len(values) - 1:
                    with torch.no_grad():
                        mlflow_ema.get_ema(model)._shadow["3.bias"].fill_(float("nan"))
                mlflow_ema.log_checkpoint(metrics={metric: value})
            if fail:
                raise RuntimeError("diverged")
    except RuntimeError:
        pass
    finally:
        _SESSION.reset()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digits):
    """A small sweep: 4 good runs from one init, one from another init, a failed run, a
    run without the metric, a run with NaN weights, and a wider model."""
    folder = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = Path.cwd()
    import os

    os.chdir(folder)
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("digits")
        _sweep_run(digits, "a", 0.1, [0.90, 0.50])  # best 0.90 at its first checkpoint
        _sweep_run(digits, "b", 0.05, [0.70, 0.80])
        _sweep_run(digits, "c", 0.02, [0.60, 0.65])
        _sweep_run(digits, "d", 0.01, [0.55, 0.58])
        _sweep_run(digits, "failed", 0.1, [0.99], fail=True)
        _sweep_run(digits, "no-metric", 0.1, [0.5], metric="loss")
        with mlflow.start_run(run_name="empty"):  # a run that logged no checkpoint
            mlflow.log_metric("ema/val_acc", 0.99)
        mlflow.set_experiment("others")
        _sweep_run(digits, "other-init", 0.1, [0.95], seed=7)
        _sweep_run(digits, "wide", 0.1, [0.96], hidden=32)
        _sweep_run(digits, "nan", 0.1, [0.97], nan=True)
    finally:
        os.chdir(previous)
        mlflow.set_tracking_uri(None)
    return folder, uri


@pytest.fixture
def cli(sweep, tmp_path, monkeypatch):
    _, uri = sweep
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EMA_TRUST_MODULES", "helpers")  # the runs record helpers:make_net
    mlflow.set_tracking_uri(uri)
    yield run_cli
    # each test leaves the registry as it found it
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    for model in client.search_registered_models():
        client.delete_registered_model(model.name)
    mlflow.set_tracking_uri(None)


def registered_versions() -> int:
    return sum(
        len(MlflowClient().search_model_versions(f"name='{m.name}'"))
        for m in MlflowClient().search_registered_models()
    )


def test_ls_ranks_runs_by_their_best_checkpoint_not_their_last_value(cli):
    rows = json.loads(cli("ls", "-e", "digits", "--json"))
    assert [(r["run_name"], r["value"]) for r in rows] == [("a", 0.9), ("b", 0.8), ("c", 0.65), ("d", 0.58)]
    rows = json.loads(cli("ls", "-e", "digits", "--checkpoint", "last", "--json"))
    assert [r["run_name"] for r in rows] == ["b", "c", "d", "a"]
    text = cli("ls", "-e", "digits")
    assert "1 of 6 runs have no READY ema checkpoint" in text  # the empty run, noted on stderr
    header = next(line for line in text.splitlines() if line.startswith("rank"))
    assert header.split() == ["rank", "run", "run", "id", "checkpoint", "step", "value"]


def test_dry_run_prints_the_selection_and_registers_nothing(cli):
    out = json.loads(
        cli("average", "-e", "digits", "--top-k", "3", "--register-as", "soup", "--dry-run", "--json")
    )
    assert [c["run_name"] for c in out["selection"]] == [
        "a",
        "b",
        "c",
    ]  # failed and metric-less runs left out
    assert [c["step"] for c in out["selection"]] == [5, 10, 10]
    assert registered_versions() == 0


def test_average_registers_a_version_that_loads_with_the_mean_weights(cli, tmp_path):
    out = json.loads(cli("average", "-e", "digits", "--top-k", "3", "--register-as", "digits-soup",
                         "--alias", "candidate", "--output", str(tmp_path / "soup"), "--json"))  # fmt: skip
    assert out["registered"]["version"] == "1" and out["registered"]["alias"] == "candidate"
    version = MlflowClient().get_model_version_by_alias("digits-soup", "candidate")
    sources = json.loads(version.tags["mlflow_ema.sources"])
    assert [s["step"] for s in sources] == [5, 10, 10]
    assert {"run_id", "model_id", "step", "value", "weight", "sha256"} <= set(sources[0])
    assert sum(s["weight"] for s in sources) == pytest.approx(1.0)
    assert version.tags["mlflow_ema.strategy"] == "uniform"
    soup = load_checkpoint(tmp_path / "soup")
    assert version.tags["mlflow_ema.sha256"] == soup.manifest.files["model.safetensors"]["sha256"]

    # the soup is the mean of the members' checkpoints; integer buffers come from the best member
    members = [
        load_checkpoint(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{s['model_id']}", dst_path=str(tmp_path / s["model_id"]))).state_dict
        for s in sources
    ]  # fmt: skip
    for key, value in soup.state_dict.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, sum(m[key] for m in members) / 3, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, members[0][key])

    # a fresh process loads the registered program by alias, without pickle, holding the soup
    code = (
        "import mlflow.pytorch, torch, sys; from mlflow_ema import load_checkpoint; "
        "m = mlflow.pytorch.load_model('models:/digits-soup@candidate'); "
        f"s = load_checkpoint(r'{tmp_path / 'soup'}').state_dict; "
        "assert type(m).__name__ != 'Sequential'; "
        "assert all(torch.equal(v, s[k]) for k, v in m.state_dict().items()); print('ok')"
    )
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
    run = mlflow.get_run(out["registered"]["run_id"])
    assert run.data.params["strategy"] == "uniform"
    assert {f"member/{i}/ema/val_acc" for i in range(3)} <= set(run.data.metrics)
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"soup", "soup.png"} <= artifacts  # the model itself is a LoggedModel of the run (MLflow 3)


def test_the_same_inputs_give_a_byte_identical_output(cli, tmp_path):
    for name in ("one", "two"):
        cli("average", "-e", "digits", "--top-k", "2", "--output", str(tmp_path / name))
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "two" / "model.safetensors"
    ).read_bytes()


def test_weights_metric_and_explicit(cli, tmp_path):
    out = json.loads(
        cli(
            "average",
            "-e",
            "digits",
            "--top-k",
            "2",
            "--weights",
            "metric",
            "--output",
            str(tmp_path / "m"),
            "--json",
        )
    )
    assert [m["weight"] for m in out["members"]] == pytest.approx([0.9 / 1.7, 0.8 / 1.7])
    out = json.loads(
        cli(
            "average",
            "-e",
            "digits",
            "--top-k",
            "2",
            "--weights",
            "3,1",
            "--output",
            str(tmp_path / "e"),
            "--json",
        )
    )
    assert [m["weight"] for m in out["members"]] == pytest.approx([0.75, 0.25])
    assert "lists 3 weights for 2" in cli("average", "-e", "digits", "--top-k", "2", "--weights", "1,1,1",
                                          "--output", str(tmp_path / "x"), code=1)  # fmt: skip


def test_greedy_soup_keeps_only_members_that_help(cli, tmp_path):
    out = json.loads(cli("average", "-e", "digits", "--top-k", "4", "--strategy", "greedy", "--eval",
                         "helpers:digits_accuracy", "--register-as", "greedy-soup", "--json"))  # fmt: skip
    kept, rejected = out["members"], out["rejected"]
    assert len(kept) + len(rejected) == 4 and kept[0]["run_name"] == "a"
    # a rejected trial scored below the soup of its time, and the soup only gets better
    assert all(out["soup_value"] > r["score"] for r in rejected)
    run = mlflow.get_run(out["registered"]["run_id"])
    assert run.data.metrics["ema/val_acc"] == pytest.approx(out["soup_value"])
    assert "needs --eval" in cli("average", "-e", "digits", "--strategy", "greedy", "--output", "g", code=1)


def test_update_bn_recomputes_batchnorm_statistics(cli, tmp_path):
    cli("average", "-e", "digits", "--top-k", "2", "--output", str(tmp_path / "plain"))
    cli(
        "average",
        "-e",
        "digits",
        "--top-k",
        "2",
        "--update-bn",
        "helpers:digits_loader",
        "--output",
        str(tmp_path / "bn"),
    )
    plain, bn = load_checkpoint(tmp_path / "plain").state_dict, load_checkpoint(tmp_path / "bn").state_dict
    assert torch.equal(plain["0.weight"], bn["0.weight"])
    assert not torch.equal(plain["1.running_mean"], bn["1.running_mean"])


def test_config_file_with_command_line_override(cli, tmp_path):
    config = tmp_path / "average.yaml"
    config.write_text(yaml.safe_dump({"experiment": "digits", "top-k": 3, "dry_run": True}))
    out = json.loads(cli("average", "--config", str(config), "--json"))
    assert len(out["selection"]) == 3
    out = json.loads(cli("average", "--config", str(config), "--top-k", "2", "--json"))
    assert len(out["selection"]) == 2
    config.write_text(yaml.safe_dump({"experiment": "digits", "topk": 3}))
    assert "unknown option 'topk'" in cli("average", "--config", str(config), code=2)


def test_the_options_of_average_are_the_fields_of_average_options(tmp_path, monkeypatch):
    """Each option is declared once, as a field of AverageOptions: `average` has one option per
    field (plus --config, --dry-run, --json), `ls` the selection ones, and the command line's
    values (and a config file's) reach AverageOptions converted."""
    from mlflow_ema.cli import main

    from mlflow_ema import workflow
    from mlflow_ema.average_options import selection_fields

    fields = [f.name for f in dataclasses.fields(mlflow_ema.AverageOptions)]
    assert [p.name for p in main.commands["average"].params] == ["config", *fields, "dry_run", "as_json"]
    selection = [f.name for f in selection_fields()]
    assert selection == ["experiments", "run_id", "filter_string", "statuses", "metric", "mode", "model_name",
                         "kind", "checkpoint"]  # fmt: skip
    assert [p.name for p in main.commands["ls"].params] == ["config", *selection, "top_k", "as_json"]

    seen = []

    def stop(options):
        seen.append(options)
        raise mlflow_ema.MlflowEmaError("stop")

    monkeypatch.setattr(workflow, "check_options", stop)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    expected = mlflow_ema.AverageOptions(experiments=("from-env",), top_k=3, max_shard_size=None,
                                         model_kwargs={"hidden": 8}, trust_modules=("pkg",))  # fmt: skip
    args = ["--top-k", "3", "--max-shard-size", "none", "--model-kwargs", '{"hidden": 8}',
            "--trust-module", "pkg"]  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"top_k": 3, "max-shard-size": "None", "model_kwargs": '{"hidden": 8}',
                                      "trust_module": "pkg"}))  # fmt: skip
    for given in (args, ["--config", str(config)]):
        result = CliRunner().invoke(main, ["average", *given])
        assert result.exit_code == 1 and "stop" in result.output
        assert seen.pop() == expected


# -- bad input: a one-line error, exit 1, nothing registered ---------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-e", "nope"], "unknown experiment 'nope'"),
        (["-e", "digits", "--metric", "val_loss"], "has a ema checkpoint with metric 'val_loss'"),
        (["-e", "digits", "--top-k", "6"], "only 4 runs qualify, --top-k asks for 6"),
        (["-e", "others", "--top-k", "2", "--filter", NOT_NAN], "did not start from the same weights"),
        (
            ["-e", "others", "--top-k", "2", "--filter", NOT_NAN, "--allow-different-init"],
            "'0.bias' is F32 [16], run wide",
        ),
        (
            ["-e", "others", "--top-k", "3", "--filter", "attributes.run_name = 'nan'", "--min-k", "1"],
            "NaN or infinite",
        ),
        (["-e", "digits", "--register-as", "bad/name"], "invalid registered-model name 'bad/name'"),
        (["--run", "0123456789abcdef"], "unknown run"),
    ],
)
def test_bad_selections_fail_in_one_line_and_register_nothing(cli, args, message):
    out = cli("average", *args, "--register-as" if "--register-as" not in args else "--alias",
              "soup" if "--register-as" not in args else "x", code=1)  # fmt: skip
    assert message in out
    assert len([line for line in out.splitlines() if "error" in line]) == 1 and "Traceback" not in out
    assert registered_versions() == 0


def test_a_run_without_checkpoints_is_refused(cli):
    (run,) = mlflow.search_runs(
        experiment_names=["digits"], filter_string="attributes.run_name = 'empty'", output_format="list"
    )
    out = cli("average", "--run", run.info.run_id, "--register-as", "soup", code=1)
    assert f"run {run.info.run_id} has no READY ema checkpoint" in out
    assert registered_versions() == 0
    # and in a sweep it is left out (its run-level 0.99 is not a checkpoint's value)
    assert "empty" not in {r["run_name"] for r in json.loads(cli("ls", "-e", "digits", "--json"))}


def test_min_k_accepts_fewer_with_a_warning(cli, tmp_path):
    out = cli("average", "-e", "digits", "--top-k", "6", "--min-k", "4", "--output", str(tmp_path / "s"))
    assert "only 4 runs qualify" in out and "averaged 4 checkpoints" in out


def test_corrupt_or_mismatched_checkpoint_files_are_refused(cli, sweep, tmp_path):
    folder, _ = sweep
    top = json.loads(cli("ls", "-e", "digits", "--json"))[0]
    weights = next((folder / "mlruns").rglob(f"{top['model_id']}/artifacts/model.safetensors"))
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # found while averaging
        out = cli("average", "-e", "digits", "--register-as", "s", "--top-k", "2",
                  "--output", str(tmp_path / "soup"), code=1)  # fmt: skip
        assert "does not match the manifest" in out and f"({top['run_id'][:8]})" in out
        assert not (tmp_path / "soup").exists()
        weights.write_bytes(original[:200])
        assert "truncated" in cli("average", "-e", "digits", "--register-as", "s", "--top-k", "2", code=1)
    finally:
        weights.write_bytes(original)
    assert registered_versions() == 0


def test_unreachable_server_is_one_line(cli, monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    out = cli("--tracking-uri", f"http://127.0.0.1:{free_port()}", "ls", "-e", "digits", code=1)
    assert "cannot reach the tracking server" in out and "Traceback" not in out


# -- promote -------------------------------------------------------------------------------------


def test_promote_moves_aliases_only_when_better_and_copies(cli, tmp_path):
    greedy = ["--strategy", "greedy", "--eval", "helpers:digits_accuracy"]
    cli("average", "-e", "digits", "--top-k", "1", *greedy, "--register-as", "soup", "--alias", "candidate")
    out = cli(
        "promote", "soup", "--from-alias", "candidate", "--to", "champion", "--if-better", "ema/val_acc"
    )
    assert "promoted: soup champion -> version 1 (was unset)" in out
    client = MlflowClient()
    tags = client.get_model_version("soup", "1").tags
    assert (
        tags["mlflow_ema.promoted_to"] == "champion" and tags["mlflow_ema.promoted_from"] == "alias candidate"
    )
    assert tags["mlflow_ema.promoted_at"]

    # a second soup: promoted only if its recorded accuracy beats version 1's
    cli("average", "-e", "digits", "--top-k", "4", *greedy, "--register-as", "soup", "--alias", "candidate")
    v1 = mlflow.get_run(client.get_model_version("soup", "1").run_id).data.metrics["ema/val_acc"]
    v2 = mlflow.get_run(client.get_model_version("soup", "2").run_id).data.metrics["ema/val_acc"]
    out = cli(
        "promote",
        "soup",
        "--to",
        "champion",
        "--if-better",
        "ema/val_acc",
        "--copy-to",
        "soup-prod",
        "--json",
    )
    result = json.loads(out)
    assert result["promoted"] == (v2 > v1)
    expected = "2" if v2 > v1 else "1"
    assert str(client.get_model_version_by_alias("soup", "champion").version) == expected
    if v2 > v1:
        assert str(client.get_model_version_by_alias("soup-prod", "champion").version) == "1"

    assert "has no alias 'nope'" in cli("promote", "soup", "--from-alias", "nope", code=1)
    assert "has no version 9" in cli("promote", "soup", "--version", "9", code=1)


def test_inspect_shows_the_manifest_and_tensors(cli):
    top = json.loads(cli("ls", "-e", "digits", "--json"))[0]
    out = json.loads(cli("inspect", f"models:/{top['model_id']}", "--json"))
    assert out["manifest"]["kind"] == "ema" and out["manifest"]["step"] == 5
    assert {"name": "0.weight", "dtype": "F32", "shape": [16, 64]} in out["tensors"]
    text = cli("inspect", f"models:/{top['model_id']}")
    assert "(verified)" in text and "1.num_batches_tracked" in text
    assert "no checkpoint folder" in cli("inspect", "/nonexistent", code=1)


def test_a_local_store_is_read_in_place_and_left_as_it_was(cli, sweep, tmp_path, monkeypatch):
    """Members in a store on this machine are averaged where they are (no 2 x k copies);
    nothing is written there."""
    folder, _ = sweep
    store = folder / "mlruns"
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}

    def no_download(*args, **kwargs):
        raise AssertionError("a local store's checkpoint was downloaded")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    out = cli("average", "-e", "digits", "--top-k", "3", "--output", str(tmp_path / "soup"))
    assert (
        "averaged 3 checkpoints" in out
        and mlflow_ema.load_checkpoint(tmp_path / "soup").manifest.kind == "soup"
    )
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before
