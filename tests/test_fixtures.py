"""The committed fixture stores (``mlruns_fixtures/format-v<N>/``) read by the current code.

Each store is a finished sweep written by the mlflow-ema of checkpoint format N (see
``mlruns_fixtures/make_fixtures.py``). The CLI ranks, averages, registers, inspects and
refuses on it without training, so later versions prove they still read old stores. Every
test works on a copy in ``tmp_path``; what a test expects comes from the store's
``fixture.json`` (what the script logged), not from the code under test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from helpers import run_cli
from mlflow import MlflowClient

import mlflow_ema
from mlflow_ema import ChecksumMismatchError, load_checkpoint
from mlflow_ema.checkpoint import FORMAT_VERSION, INDEX_FILE, weight_files, weights_digest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "mlruns_fixtures"
STORES = sorted(FIXTURES.glob("format-v*"), key=lambda p: int(p.name.removeprefix("format-v")))
BIN = Path(sys.executable).parent
RANKED_ROLES = ("good", "other-init", "corrupt")  # FINISHED, not deleted, with ema/val_acc


def _make_fixtures():
    """mlruns_fixtures/make_fixtures.py as a module (no __pycache__ left in the repository)."""
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = before
    return module


mf = _make_fixtures()


def head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def known_revision(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    try:
        ScriptDirectory.from_config(_get_alembic_config("")).get_revision(revision)
    except Exception:
        return False
    return True


def copy_fixture(source: Path, dest: Path) -> dict:
    """A copy of a fixture store, as the default store of ``dest``; skips a store written by a
    newer MLflow than the installed one."""
    info = mf.copy_store(source, dest)
    if not known_revision(mf.schema_revision(dest / "mlflow.db")):
        pytest.skip(
            f"{source.name} was written by MLflow {info['mlflow_version']}, newer than {mlflow.__version__}"
        )
    return info


def uri_of(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


class Store:
    def __init__(self, path: Path, info: dict):
        self.path, self.info = path, info
        self.runs = info["runs"]

    def run_id(self, name: str) -> str:
        return self.runs[name]["run_id"]

    def checkpoint_dir(self, checkpoint: dict) -> Path:
        return self.path / checkpoint["artifact_location"]

    def expected_ranking(self, metric="ema/val_acc", kind="ema", checkpoint="best") -> list[tuple[str, dict]]:
        """(run name, checkpoint) of the runs ``ls`` must list, best first, from what the script logged."""
        rows = []
        for name, run in self.runs.items():
            if run["status"] != "FINISHED" or run["deleted"]:
                continue
            mine = [c for c in run["checkpoints"] if c["kind"] == kind]
            if checkpoint == "last":
                chosen = max(mine, key=lambda c: c["step"])
                chosen = chosen if metric in chosen["metrics"] else None
            else:
                chosen = mf.best_checkpoint({"checkpoints": mine}, metric)
            if chosen is not None:
                rows.append((name, chosen))
        values = [c["metrics"][metric] for _, c in rows]
        assert len(set(values)) == len(values), f"ties make the expected order ambiguous: {rows}"
        return sorted(rows, key=lambda row: -row[1]["metrics"][metric])


@pytest.fixture(params=STORES, ids=lambda p: p.name)
def store(request, tmp_path, monkeypatch):
    """A copy of one fixture store in tmp_path, brought to the installed MLflow's schema if it
    is older, as the default store of the working directory (``sqlite:///mlflow.db``)."""
    copy = tmp_path / "store"
    info = copy_fixture(request.param, copy)
    if mf.schema_revision(copy / "mlflow.db") != head_revision():  # a store from an older MLflow
        subprocess.run([str(BIN / "mlflow"), "db", "upgrade", uri_of(copy)], check=True, capture_output=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.syspath_prepend(str(REPO))  # the recorded factory: examples.train_digits:build_model
    monkeypatch.setenv("MLFLOW_EMA_TRUST_MODULES", "examples")
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    mlflow.set_tracking_uri(None)
    yield Store(copy, info)
    mlflow.set_tracking_uri(None)


cli = run_cli  # the real click app in-process (tests/helpers.py)


def one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("mlflow-ema: error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def registered_versions() -> int:
    client = MlflowClient()
    return sum(
        len(client.search_model_versions(f"name='{m.name}'")) for m in client.search_registered_models()
    )


# -- the stores themselves ----------------------------------------------------------------------


def test_a_store_for_every_released_format_version_small_and_portable():
    assert [p.name for p in STORES] == [f"format-v{n}" for n in range(1, FORMAT_VERSION + 1)], (
        f"checkpoint format {FORMAT_VERSION} needs its store: python mlruns_fixtures/make_fixtures.py"
    )
    total = sum(p.lstat().st_blocks * 512 for p in FIXTURES.rglob("*"))
    assert total < 5 * 2**20, f"mlruns_fixtures/ takes {total / 2**20:.1f} MiB on disk, more than 5 MiB"
    for folder in STORES:
        info = json.loads((folder / "fixture.json").read_text())
        assert folder.name == f"format-v{info['format_version']}"
        assert mf.schema_revision(folder / "mlflow.db") == info["schema_revision"]
        with sqlite3.connect(f"file:{folder / 'mlflow.db'}?mode=ro", uri=True) as db:
            locations = [row[0] for row in db.execute("SELECT artifact_location FROM experiments")]
            locations += [row[0] for row in db.execute("SELECT artifact_uri FROM runs")]
            locations += [row[0] for row in db.execute("SELECT artifact_location FROM logged_models")]
        db.close()
        # no absolute path of the machine that built it: the placeholder copy_store() replaces
        assert locations and all(loc.startswith(mf.PLACEHOLDER + "/mlruns/") for loc in locations), locations


# -- ls ---------------------------------------------------------------------------------------------


def test_ls_ranks_only_the_finished_runs_that_have_the_metric(store):
    rows = json.loads(cli("ls", "-e", "sweep", "--json"))
    names = [r["run_name"] for r in rows]
    # failed (FAILED), deleted (MLflow hides deleted runs) and no-metric (no ema/val_acc) are left out
    assert sorted(names) == ["corrupt", "good-a", "good-b", "good-c", "other-init"]
    assert names[0] == "other-init"  # it ranks first: averaging it must be refused (see below)
    expected = store.expected_ranking()
    assert [(r["run_name"], r["model_id"], r["step"]) for r in rows] == [
        (name, c["model_id"], c["step"]) for name, c in expected
    ]
    assert [r["value"] for r in rows] == pytest.approx([c["metrics"]["ema/val_acc"] for _, c in expected])

    # each exclusion has its stated reason: the same runs come back when the reason is lifted
    failed = [r["run_name"] for r in json.loads(cli("ls", "-e", "sweep", "--status", "FAILED", "--json"))]
    assert failed == ["failed"]
    raw = json.loads(cli("ls", "-e", "sweep", "--kind", "raw", "--metric", "val_acc", "--json"))
    assert "no-metric" in {r["run_name"] for r in raw} and "failed" not in {r["run_name"] for r in raw}
    deleted = MlflowClient().get_run(store.run_id("deleted"))
    assert deleted.info.lifecycle_stage == "deleted" and deleted.info.status == "FINISHED"
    everything = json.loads(cli("ls", "-e", "sweep", "--status", "FINISHED", "--status", "FAILED", "--json"))
    assert "deleted" not in {r["run_name"] for r in everything}

    # --checkpoint last ranks each run's last checkpoint: another order, another step for good-a
    last = json.loads(cli("ls", "-e", "sweep", "--checkpoint", "last", "--json"))
    assert [(r["run_name"], r["step"]) for r in last] == [
        (name, c["step"]) for name, c in store.expected_ranking(checkpoint="last")
    ]
    assert [r["run_name"] for r in last] != names

    MlflowClient().restore_run(store.run_id("deleted"))  # (last: this changes the store)
    assert "deleted" in {r["run_name"] for r in json.loads(cli("ls", "-e", "sweep", "--json"))}


def test_a_copy_is_the_default_store_of_its_folder_for_the_installed_command(store):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [str(BIN / "mlflow-ema"), "ls", "-e", "sweep"],
        cwd=store.path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    table = [line.split() for line in done.stdout.splitlines()]
    assert table[0][:2] == ["rank", "run"]
    assert [row[1] for row in table[1:]] == [name for name, _ in store.expected_ranking()]


def test_one_runs_best_and_last_checkpoints_differ(store):
    run_id = store.run_id("good-a")
    ema = [c for c in store.runs["good-a"]["checkpoints"] if c["kind"] == "ema"]
    best = json.loads(cli("average", "--run", run_id, "--top-k", "2", "--dry-run", "--json"))["selection"]
    last = json.loads(
        cli("average", "--run", run_id, "--top-k", "2", "--checkpoint", "last", "--dry-run", "--json")
    )["selection"]
    by_value = sorted(ema, key=lambda c: -c["metrics"]["ema/val_acc"])[:2]
    by_step = sorted(ema, key=lambda c: -c["step"])[:2]
    assert [c["model_id"] for c in best] == [c["model_id"] for c in by_value]
    assert [c["model_id"] for c in last] == [c["model_id"] for c in by_step]
    assert best != last


# -- average --------------------------------------------------------------------------------------


def _mean_of(store: Store, members: list[dict], soup: dict) -> None:
    """``soup`` is the uniform mean of the members' checkpoints as stored in the fixture;
    integer buffers come from the best-ranked member."""
    states = [load_checkpoint(store.checkpoint_dir(c)).state_dict for c in members]
    assert set(soup) == set(states[0])
    for key, value in soup.items():
        if value.is_floating_point():
            expected = sum(s[key] for s in states) / len(states)
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, states[0][key])


def test_average_the_good_runs_to_a_folder_and_to_the_registry(store, tmp_path):
    good = [(n, c) for n, c in store.expected_ranking() if store.runs[n]["role"] == "good"]
    assert len(good) == 3
    out = json.loads(cli("average", "-e", "sweep", "--filter", "tags.fixture_role = 'good'", "--top-k", "2",
                         "--output", str(tmp_path / "top2"), "--json"))  # fmt: skip
    assert [m["model_id"] for m in out["members"]] == [c["model_id"] for _, c in good[:2]]
    assert out["registered"] is None
    soup = load_checkpoint(tmp_path / "top2")
    assert (
        soup.manifest.kind == "soup"
        and soup.manifest.init_fingerprint == store.runs["good-a"]["init_fingerprint"]
    )
    _mean_of(store, [c for _, c in good[:2]], soup.state_dict)

    out = json.loads(cli("average", "-e", "sweep", "--filter", "tags.fixture_role = 'good'", "--top-k", "3",
                         "--register-as", "fixture-soup", "--alias", "candidate",
                         "--output", str(tmp_path / "top3"), "--json"))  # fmt: skip
    assert [m["run_name"] for m in out["members"]] == [n for n, _ in good]
    soup = load_checkpoint(tmp_path / "top3")
    _mean_of(store, [c for _, c in good], soup.state_dict)
    version = MlflowClient().get_model_version_by_alias("fixture-soup", "candidate")
    assert str(version.version) == out["registered"]["version"] == "1"
    assert version.tags["mlflow_ema.sha256"] == soup.manifest.files["model.safetensors"]["sha256"]
    sources = json.loads(version.tags["mlflow_ema.sources"])
    assert [s["model_id"] for s in sources] == [c["model_id"] for _, c in good]
    assert [s["sha256"] for s in sources] == [c["stored_sha256"] for _, c in good]
    # the registered model was rebuilt from the recorded factory and holds the soup
    import mlflow.pytorch

    model = mlflow.pytorch.load_model("models:/fixture-soup@candidate")
    assert all(torch.equal(v, soup.state_dict[k]) for k, v in model.state_dict().items())


def test_runs_of_0_2_register_with_a_factory_as_a_pickle_that_loads_only_on_request(store, tmp_path):
    """These runs recorded no inputs (mlflow-ema < 0.4): no pt2 program can be made."""
    args = ("average", "-e", "sweep", "--filter", "tags.fixture_role = 'good'", "--top-k", "2")
    line = one_error_line(cli(*args, "--register-as", "never", "--serialization", "pt2", code=1))
    assert "--serialization pt2 needs the model's inputs" in line and "mlflow-ema < 0.4" in line
    assert registered_versions() == 0
    output = cli(*args, "--register-as", "legacy", "--alias", "candidate")
    assert "registering it as a pickle" in output  # the warning says so
    with pytest.raises(mlflow_ema.CheckpointError, match=r"is a pickle .* allow_pickle=True"):
        mlflow_ema.load_model("models:/legacy@candidate")
    model = mlflow_ema.load_model("models:/legacy@candidate", allow_pickle=True)
    soup = mlflow_ema.load_state_dict("models:/legacy@candidate")
    assert type(model).__name__ == "Sequential" and not model.training
    assert all(torch.equal(v, soup[k]) for k, v in model.state_dict().items())


def test_a_corrupt_checkpoint_is_refused_in_one_line_and_nothing_is_registered(store, tmp_path):
    corrupt = [c for c in store.runs["corrupt"]["checkpoints"] if c["corrupt"]]
    assert len(corrupt) == 1 and corrupt[0] == mf.best_checkpoint(store.runs["corrupt"])
    runs_before = len(mlflow.search_runs(experiment_names=["sweep"], output_format="list"))
    top = len(store.expected_ranking()) - 1  # every ranked run but other-init
    output = cli("average", "-e", "sweep", "--filter", "attributes.run_name != 'other-init'", "--top-k", str(top),
                 "--register-as", "never", "--output", str(tmp_path / "soup"), code=1)  # fmt: skip
    error = one_error_line(output)
    assert (
        f"run corrupt ({store.run_id('corrupt')[:8]}) {corrupt[0]['name']}: model.safetensors sha256" in error
    )
    assert "does not match the manifest" in error
    assert registered_versions() == 0
    assert not (tmp_path / "soup").exists()
    assert len(mlflow.search_runs(experiment_names=["sweep"], output_format="list")) == runs_before

    # inspect refuses it too, and shows it without the check
    error = one_error_line(cli("inspect", f"models:/{corrupt[0]['model_id']}", code=1))
    assert "does not match the manifest" in error
    assert "(verified)" not in cli("inspect", f"models:/{corrupt[0]['model_id']}", "--no-verify")


def test_the_other_initialization_is_refused_unless_allowed(store, tmp_path):
    args = ["average", "-e", "sweep", "--filter", "attributes.run_name != 'corrupt'", "--top-k", "4"]
    ranked = [(n, c) for n, c in store.expected_ranking() if n != "corrupt"]
    assert len(ranked) == 4 and ranked[0][0] == "other-init"
    error = one_error_line(cli(*args, "--register-as", "never", code=1))
    assert "did not start from the same weights" in error and "run other-init" in error
    assert "--allow-different-init" in error
    assert registered_versions() == 0

    out = json.loads(cli(*args, "--allow-different-init", "--output", str(tmp_path / "mixed"), "--json"))
    assert [m["run_name"] for m in out["members"]] == [n for n, _ in ranked]
    _mean_of(store, [c for _, c in ranked], load_checkpoint(tmp_path / "mixed").state_dict)


# -- checkpoints ------------------------------------------------------------------------------------


def test_inspect_verifies_a_fixture_checkpoints_sha256(store):
    _, best = next((n, c) for n, c in store.expected_ranking() if not c["corrupt"])
    out = json.loads(cli("inspect", f"models:/{best['model_id']}", "--json"))
    assert out["manifest"]["files"]["model.safetensors"]["sha256"] == best["stored_sha256"]
    assert (out["manifest"]["kind"], out["manifest"]["step"]) == ("ema", best["step"])
    assert out["manifest"]["format_version"] == store.info["format_version"]
    hidden = store.info["model_kwargs"]["hidden"]
    assert {"name": "0.weight", "dtype": "F32", "shape": [hidden, 64]} in out["tensors"]
    text = cli("inspect", str(store.checkpoint_dir(best)))
    assert f"sha256 {best['stored_sha256']} (verified)" in text


def test_every_fixture_checkpoint_loads_with_the_current_code(store):
    from examples.train_digits import build_model

    model = build_model(**store.info["model_kwargs"])
    checked = 0
    for run in store.runs.values():
        for c in run["checkpoints"]:
            folder = store.checkpoint_dir(c)
            if c["corrupt"]:
                with pytest.raises(ChecksumMismatchError, match="does not match the manifest"):
                    load_checkpoint(folder)
                continue
            state, manifest = load_checkpoint(folder)
            assert manifest.format_version == store.info["format_version"]
            assert (manifest.kind, manifest.step, manifest.epoch) == (c["kind"], c["step"], c["epoch"])
            assert manifest.init_fingerprint == run["init_fingerprint"] and manifest.all_finite
            assert weights_digest(manifest) == c["stored_sha256"] == c["sha256"]
            assert manifest.sharded == c.get("sharded", False)  # (format 1 has no sharded checkpoints)
            model.load_state_dict(state)  # strict: the recorded architecture, every tensor
            checked += 1
    assert checked == sum(len(r["checkpoints"]) for r in store.runs.values()) - 1


def test_sharded_fixture_checkpoints_are_hugging_face_folders_and_inspect_lists_every_shard(store):
    """From format 2 on, good-a's checkpoints are sharded (make_fixtures.py): the folder reads as
    Hugging Face tooling reads it, and `inspect models:/<id>` verifies every shard."""
    sharded = [c for run in store.runs.values() for c in run["checkpoints"] if c.get("sharded")]
    if store.info["format_version"] < 2:
        assert not sharded
        pytest.skip("format 1 has no sharded checkpoints")
    assert {c["model_id"] for c in sharded} == {c["model_id"] for c in store.runs["good-a"]["checkpoints"]}
    import safetensors.torch

    for c in sharded:
        folder = store.checkpoint_dir(c)
        index = json.loads((folder / INDEX_FILE).read_text())
        tensors = {}
        for shard in sorted(set(index["weight_map"].values())):
            tensors.update(safetensors.torch.load_file(folder / shard))
        state, manifest = load_checkpoint(folder)
        assert len(weight_files(manifest)) >= 2 and "model.safetensors" not in manifest.files
        assert sorted(tensors) == sorted(index["weight_map"]) == sorted(state)
        assert all(torch.equal(tensors[k], state[k]) for k in state)

    best = mf.best_checkpoint(store.runs["good-a"])
    out = json.loads(cli("inspect", f"models:/{best['model_id']}", "--json"))
    shards = [n for n in out["manifest"]["files"] if n.startswith("model-")]
    assert len(shards) >= 2 and INDEX_FILE in out["manifest"]["files"]
    hidden = store.info["model_kwargs"]["hidden"]
    assert {"name": "0.weight", "dtype": "F32", "shape": [hidden, 64]} in out["tensors"]
    text = cli("inspect", f"models:/{best['model_id']}")
    assert all(f"file {name}: " in text for name in shards)
    assert text.count("(verified)") == len(out["manifest"]["files"])


def test_average_with_max_shard_size_writes_and_registers_a_sharded_soup(store, tmp_path):
    """End to end on the real store: the good runs (in format 2, the best one sharded, the others
    not) averaged into a soup sharded at 2 KB, written with --output and registered."""
    good = [(n, c) for n, c in store.expected_ranking() if store.runs[n]["role"] == "good"]
    args = ["average", "-e", "sweep", "--filter", "tags.fixture_role = 'good'", "--top-k", "3"]
    line = one_error_line(cli(*args, "--max-shard-size", "2Gb", "--register-as", "never", code=1))
    assert "--max-shard-size must be a positive number of bytes" in line and "'2Gb'" in line
    assert registered_versions() == 0

    out = json.loads(cli(*args, "--max-shard-size", "2KB", "--output", str(tmp_path / "soup"),
                         "--register-as", "sharded-soup", "--json"))  # fmt: skip
    assert [m["model_id"] for m in out["members"]] == [c["model_id"] for _, c in good]
    soup = load_checkpoint(tmp_path / "soup")
    assert soup.manifest.sharded and len(weight_files(soup.manifest)) >= 2
    _mean_of(store, [c for _, c in good], soup.state_dict)

    version = MlflowClient().get_model_version("sharded-soup", out["registered"]["version"])
    assert version.tags["mlflow_ema.sha256"] == weights_digest(soup.manifest) == out["registered"]["sha256"]
    sources = json.loads(version.tags["mlflow_ema.sources"])
    assert [s["sha256"] for s in sources] == [c["stored_sha256"] for _, c in good]
    stored = {a.path for a in MlflowClient().list_artifacts(out["registered"]["run_id"], "soup")}
    assert stored == {f"soup/{name}" for name in [*soup.manifest.files, "manifest.json"]}
    import mlflow.pytorch

    model = mlflow.pytorch.load_model("models:/sharded-soup/1")
    assert all(torch.equal(v, soup.state_dict[k]) for k, v in model.state_dict().items())

    cli(*args, "--max-shard-size", "none", "--output", str(tmp_path / "flat"))
    flat = load_checkpoint(tmp_path / "flat")
    assert sorted(flat.manifest.files) == ["model.safetensors"]
    assert all(torch.equal(flat.state_dict[k], v) for k, v in soup.state_dict.items())


# -- the script ----------------------------------------------------------------------------------------


def test_the_script_refuses_to_overwrite_a_store(tmp_path):
    (tmp_path / f"format-v{FORMAT_VERSION}").mkdir()
    assert mf.main(["--out", str(tmp_path)]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"format-v{FORMAT_VERSION}"]  # nothing else written


def test_the_script_rebuilds_the_committed_checkpoints_byte_for_byte(tmp_path):
    committed = FIXTURES / f"format-v{FORMAT_VERSION}"
    assert committed.is_dir(), (
        f"no store for format {FORMAT_VERSION}: python mlruns_fixtures/make_fixtures.py"
    )
    info = json.loads((committed / "fixture.json").read_text())
    if info["torch_version"] != torch.__version__ or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"bit-identical only with torch {info['torch_version']} on x86-64")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, str(FIXTURES / "make_fixtures.py"), "--out", str(tmp_path)],
        cwd=tmp_path, env={**env, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rebuilt = tmp_path / f"format-v{FORMAT_VERSION}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [rebuilt.name]  # no leftover staging folder

    def contents(folder: Path) -> dict:
        data = json.loads((folder / "fixture.json").read_text())
        found = {}
        for name, run in data["runs"].items():
            for c in run["checkpoints"]:
                files = folder / c["artifact_location"]
                manifest = json.loads((files / "manifest.json").read_text())
                manifest.pop("created_by")  # the mlflow-ema version: may move on without a format change
                found[name, c["name"]] = (
                    {f.name: mf.sha256(f) for f in sorted(files.iterdir()) if f.name != "manifest.json"},
                    manifest,
                    c["metrics"],
                    run["status"],
                    run["deleted"],
                )
        return found

    old, new = contents(committed), contents(rebuilt)
    assert sorted(old) == sorted(new)
    differ = [key for key in old if old[key] != new[key]]
    assert not differ, (
        f"{len(differ)} checkpoints differ, e.g. {differ[0]}: {old[differ[0]]} vs {new[differ[0]]}"
    )


# -- MLflow schema -------------------------------------------------------------------------------------


def main_cli():
    from mlflow_ema.cli import main

    return main


def _alembic(uri: str):
    from mlflow.store.db.utils import _get_alembic_config

    return _get_alembic_config(uri)


@pytest.mark.parametrize("source", STORES, ids=lambda p: p.name)
def test_a_genuinely_older_schema_works_or_names_the_upgrade_command(source, tmp_path, monkeypatch):
    """Two copies made older with MLflow's own migrations (one revision down, unless the
    store already is older than the installed MLflow). On the first, the CLI either works
    (MLflow 3.17 upgrades a store that lacks tables itself) or fails with the command to
    run; on the second, that command, `mlflow db upgrade <uri>`, makes it work."""
    from alembic import command

    copies = [tmp_path / "a", tmp_path / "b"]
    for copy in copies:
        info = copy_fixture(source, copy)
        if mf.schema_revision(copy / "mlflow.db") == head_revision():
            command.downgrade(_alembic(uri_of(copy)), "-1")
    older = mf.schema_revision(copies[0] / "mlflow.db")
    assert older != head_revision() and known_revision(older)
    names = [n for n, _ in Store(copies[0], info).expected_ranking()]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    mlflow.set_tracking_uri(None)

    monkeypatch.chdir(copies[0])
    from mlflow_ema.cli import main

    result = CliRunner().invoke(main, ["ls", "-e", "sweep", "--json"])
    if result.exit_code == 0:  # MLflow migrated the store on opening it
        assert [r["run_name"] for r in json.loads(result.stdout)] == names
        assert mf.schema_revision(copies[0] / "mlflow.db") == head_revision()
    else:
        assert result.exit_code == 1, result.output
        line = one_error_line(result.output)
        assert f"run: mlflow db upgrade {uri_of(copies[0])}" in line
        upgrade = shlex.split(line.split("run: ", 1)[1])
        subprocess.run([str(BIN / "mlflow"), *upgrade[1:]], check=True, capture_output=True)
        assert [r["run_name"] for r in json.loads(cli("ls", "-e", "sweep", "--json"))] == names

    monkeypatch.chdir(copies[1])
    done = subprocess.run(
        [str(BIN / "mlflow"), "db", "upgrade", uri_of(copies[1])], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert mf.schema_revision(copies[1] / "mlflow.db") == head_revision()
    assert [r["run_name"] for r in json.loads(cli("ls", "-e", "sweep", "--json"))] == names
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("source", STORES, ids=lambda p: p.name)
def test_a_store_recorded_at_another_schema_revision_fails_in_one_line(source, tmp_path, monkeypatch):
    """A store whose recorded revision is older than MLflow's head, no table missing (how a
    newer MLflow that only adds columns sees an older store): MLflow 3.17 refuses it, and the
    CLI says what to do (`mlflow db upgrade <the store's URI>`); MLflow 3.18 migrates it when
    it opens it. A revision this MLflow does not know: upgrade MLflow."""
    from alembic import command
    from alembic.script import ScriptDirectory

    copy = tmp_path / "store"
    copy_fixture(source, copy)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    head = head_revision()
    previous = ScriptDirectory.from_config(_alembic("")).get_revision(head).down_revision
    command.stamp(_alembic(uri_of(copy)), previous)  # the tables stay; the recorded revision is older

    uri = uri_of(copy)
    result = CliRunner().invoke(main_cli(), ["ls", "-e", "sweep"])
    if result.exit_code == 0:  # MLflow >= 3.18 migrates an older sqlite store when it opens it
        assert mf.schema_revision(copy / "mlflow.db") == head and "good-a" in result.output
    else:  # MLflow 3.17 refuses it: the CLI says what to run
        assert one_error_line(result.output) == (
            f"mlflow-ema: error: the MLflow store {uri} has an older schema (revision {previous}, this MLflow "
            f"{mlflow.__version__} needs {head}); back it up, then run: mlflow db upgrade {uri}"
        )

    with sqlite3.connect(copy / "mlflow.db") as db:  # as a newer MLflow would have left it
        db.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    db.close()
    result = CliRunner().invoke(main_cli(), ["ls", "-e", "sweep"])
    if result.exit_code != 0:  # MLflow 3.17 refuses it; 3.18 opens it as it is
        line = one_error_line(result.output)
        assert f"the MLflow store {uri} has schema revision ffffffffffff, unknown to this MLflow" in line
        assert line.endswith("written by a newer MLflow; upgrade MLflow") and "mlflow db upgrade" not in line
    else:
        assert "good-a" in result.output  # ranked as usual
    mlflow.set_tracking_uri(None)
