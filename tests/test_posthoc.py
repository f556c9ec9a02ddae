"""Issue 14: post-hoc EMA. Power-function EMAs snapshotted during real training on digits,
tracked in MLflow, combined after training into EMAs of other lengths by ``mlflow-ema
posthoc``, and checked against an EMA of that length tracked directly in the same run."""

from __future__ import annotations

import json
import os
import types
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import digits_accuracy, logged_models, make_mlp, run_cli, train_steps
from mlflow import MlflowClient

import mlflow_ema
from mlflow_ema import EMA, PosthocError, PowerFunctionDecay, posthoc_coefficients
from mlflow_ema.tracking import _SESSION

STEPS, EVERY = 520, 50  # snapshots at 50, 100, ..., 500, and 520 when the run ends


# -- the maths ------------------------------------------------------------------------------------


def test_coefficients_sum_to_one_in_float64_and_a_snapshot_reconstructs_itself():
    steps = list(range(50, 501, 50)) * 2
    sigmas = [0.05] * 10 + [0.10] * 10
    c = posthoc_coefficients(steps, sigmas, 500, 0.08)
    assert c.dtype == np.float64 and len(c) == 20 and abs(c.sum() - 1) < 1e-12
    assert (c < 0).any()  # a least-squares combination, not an average
    itself = posthoc_coefficients(steps, sigmas, 250, 0.05)
    assert abs(itself[4] - 1) < 1e-6 and np.abs(np.delete(itself, 4)).max() < 1e-6
    assert (itself[steps.index(300) :: 10] == 0).all()  # taken after step 250: not used


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([], [], 10, 0.05), "no snapshots"),
        (([50, 100], [0.05, 0.05], 100, 0.05), "at least two sigma_rel values"),
        (([50, 50], [0.05, 0.1], 51, 0.05), "beyond the last snapshot (step 50)"),
        (([50, 50, 50], [0.05, 0.1, 0.05], 50, 0.07), "two snapshots of sigma_rel 0.05 at step 50"),
        (([1000, 1000], [0.05, 0.0500001], 1000, 0.05000005), "singular (condition number"),
        (([50, 50], [0.05, 0.1], 50, 0.5), "target sigma_rel must be in (0, 0.2887]"),
        (([50, 50], [0.05], 50, 0.07), "2 snapshot steps but 1 sigma_rel"),
        (([50, 0], [0.05, 0.1], 50, 0.07), "snapshot step must be an integer >= 1"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    with pytest.raises(PosthocError, match=None) as error:
        posthoc_coefficients(*args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_outside_the_tracked_range_and_ill_conditioned_systems_warn():
    with pytest.warns(UserWarning, match=r"sigma_rel 0.2 is outside the tracked range \[0.05, 0.1\]"):
        posthoc_coefficients([50, 50], [0.05, 0.1], 50, 0.2)
    with pytest.warns(UserWarning, match="ill-conditioned"):
        posthoc_coefficients([1000, 1000], [0.05, 0.05001], 1000, 0.050005)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a long run with many snapshots: no warning
        posthoc_coefficients(list(range(1000, 100_001, 1000)) * 2, [0.05] * 100 + [0.1] * 100, 100_000, 0.07)


def test_power_function_decay_weighs_each_step_by_its_profile_and_is_saved_with_the_ema():
    decay = PowerFunctionDecay(0.1)
    gamma = decay.gamma
    assert decay(1) == 0.0 and abs(((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5 - 0.1) < 1e-12
    # A one-weight model holding s after step s: its EMA at t is sum_s s * w_s, with
    # w_s = (s**(gamma+1) - (s-1)**(gamma+1)) / t**(gamma+1) (module docstring of posthoc_math).
    model = torch.nn.Linear(1, 1, bias=False).double()
    ema = EMA(model, decay=decay)
    for s in range(1, 201):
        model.weight.data.fill_(float(s))
        ema.update()
    t = np.arange(1, 201, dtype=np.float64)
    expected = (t * (t ** (gamma + 1) - (t - 1) ** (gamma + 1))).sum() / 200 ** (gamma + 1)
    assert abs(ema.model_state_dict()["weight"].item() - expected) < 1e-9
    restored = EMA(model)  # built with the default schedule, restored to the saved one
    restored.load_state_dict(ema.state_dict())
    assert restored.schedule == PowerFunctionDecay(0.1) and restored.step == 200


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"posthoc_every_n_steps": 0}, "posthoc_every_n_steps must be an integer >= 1"),
        ({"posthoc_every_n_steps": 10, "posthoc_sigma_rels": (0.05,)}, "at least two different values"),
        ({"posthoc_every_n_steps": 10, "posthoc_sigma_rels": (0.05, 0.4)}, "must be in (0, 0.2887]"),
    ],
)
def test_bad_training_options_are_refused_at_once(options, message):
    with pytest.raises(ValueError) as error:
        mlflow_ema.autolog(**options)
    assert message in str(error.value)


# -- one real training run, shared ------------------------------------------------------------------


@pytest.fixture(scope="module")
def phema(tmp_path_factory, digits):
    """A user's loop on digits with ``autolog(posthoc_every_n_steps=50)``, and beside it an
    EMA of ``sigma_rel=0.08`` the user tracks directly; plus a run with no snapshots."""
    folder = tmp_path_factory.mktemp("posthoc")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous = Path.cwd()
    os.chdir(folder)
    mlflow.set_tracking_uri(uri)
    _SESSION.reset()
    try:
        mlflow.set_experiment("phema")
        mlflow_ema.autolog(posthoc_every_n_steps=EVERY, posthoc_sigma_rels=(0.05, 0.10))
        model = make_mlp(hidden=32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        direct = EMA(model, decay=PowerFunctionDecay(0.08))
        with mlflow.start_run(run_name="phema") as run:
            train_steps(model, optimizer, digits, STEPS, after_step=direct.update)
            with mlflow_ema.swap():
                mlflow.log_metric("ema/val_acc", digits_accuracy(model))
        with mlflow.start_run(run_name="plain") as plain:
            mlflow.log_metric("ema/val_acc", 0.5)
    finally:
        _SESSION.reset()
        os.chdir(previous)
        mlflow.set_tracking_uri(None)
    return types.SimpleNamespace(
        uri=uri, run_id=run.info.run_id, plain_id=plain.info.run_id,
        direct={k: v.clone() for k, v in direct.model_state_dict().items()},
        raw={k: v.clone() for k, v in model.state_dict().items()},
    )  # fmt: skip


@pytest.fixture
def cli(phema, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", phema.uri)
    mlflow.set_tracking_uri(phema.uri)
    yield run_cli
    mlflow.set_tracking_uri(None)


def distance(a: dict, b: dict) -> float:
    return sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b) ** 0.5


def test_snapshots_are_ready_logged_models_named_and_tagged(cli, phema):
    models = [m for m in logged_models(phema.run_id) if m.tags["mlflow_ema.kind"] == "posthoc"]
    expected_steps = [*range(EVERY, STEPS + 1, EVERY), STEPS]
    for sigma, label in ((0.05, "0_05"), (0.1, "0_1")):
        mine = [m for m in models if m.tags["mlflow_ema.sigma_rel"] == str(sigma)]
        assert [m.name for m in mine] == [f"posthoc{label}-step{s}" for s in expected_steps]
        assert [int(m.tags["mlflow_ema.step"]) for m in mine] == expected_steps
        assert all(m.status.name == "READY" and m.source_run_id == phema.run_id for m in mine)
    last = next(m for m in models if m.name == "posthoc0_1-step520")
    state, manifest = mlflow_ema.load_checkpoint(f"models:/{last.model_id}")
    assert manifest.kind == "posthoc" and manifest.ema_updates == STEPS
    assert all(t.dtype == torch.float32 for t in state.values())


def test_a_reconstruction_matches_the_ema_tracked_directly(cli, phema, tmp_path):
    """Issue 14, item 4: 0.08 from the 0.05 and 0.10 snapshots, within 1% of the distance
    between the direct EMA and the raw weights (the figure is printed: about 0.1%)."""
    out = tmp_path / "out"
    data = json.loads(cli("posthoc", "--run", phema.run_id, "--sigma-rel", "0.08,0.12", "--output", str(out),
                          "--json"))  # fmt: skip
    assert [d["sigma_rel"] for d in data] == [0.08, 0.12] and all(d["step"] == STEPS for d in data)
    coefficients = data[0]["coefficients"]
    assert len(coefficients) == 22 and abs(sum(c["coefficient"] for c in coefficients) - 1) < 1e-9
    assert {c["sigma_rel"] for c in coefficients} == {0.05, 0.1}
    assert sorted(p.name for p in out.iterdir()) == ["sigma_rel-0.08", "sigma_rel-0.12"]
    rebuilt, manifest = mlflow_ema.load_checkpoint(out / "sigma_rel-0.08")
    error = distance(rebuilt, phema.direct) / distance(phema.raw, phema.direct)
    print(f"post-hoc 0.08 vs direct: {100 * error:.3f}% of |direct - raw|")
    assert error < 0.01
    assert manifest.kind == "soup" and manifest.metadata["strategy"] == "posthoc"
    assert manifest.metadata["sigma_rel"] == 0.08 and len(manifest.metadata["sources"]) == 22


def test_a_snapshot_at_its_own_step_reconstructs_to_itself(cli, phema, tmp_path):
    out = tmp_path / "one"
    (plan,) = json.loads(cli("posthoc", "--run", phema.run_id, "--sigma-rel", "0.05", "--step", "250",
                             "--output", str(out), "--json"))  # fmt: skip
    assert plan["step"] == 250 and len(plan["coefficients"]) == 10  # the snapshots taken by step 250
    itself = next(c for c in plan["coefficients"] if c["step"] == 250 and c["sigma_rel"] == 0.05)
    assert abs(itself["coefficient"] - 1) < 1e-6
    rebuilt, _ = mlflow_ema.load_checkpoint(out)  # one target: the folder itself
    snapshot, _ = mlflow_ema.load_checkpoint(f"models:/{itself['model_id']}")
    assert all(torch.allclose(rebuilt[k], snapshot[k], atol=1e-5) for k in snapshot)


def test_eval_chooses_the_length_registers_it_with_lineage_and_logs_the_curve(cli, phema):
    text = cli("posthoc", "--run", phema.run_id, "--sigma-rel", "0.05,0.08,0.1", "--eval",
               "helpers:digits_accuracy", "--register-as", "digits-phema", "--alias", "candidate")  # fmt: skip
    assert text.splitlines()[0].split() == ["sigma_rel", "ema/val_acc", "snapshots"]
    assert (
        "<- chosen" in text and "registered digits-phema version 1 (models:/digits-phema@candidate)" in text
    )
    client = MlflowClient()
    version = client.get_model_version_by_alias("digits-phema", "candidate")
    chosen = float(version.tags["mlflow_ema.sigma_rel"])
    sources = json.loads(version.tags["mlflow_ema.sources"])
    assert version.tags["mlflow_ema.strategy"] == "posthoc" and version.tags["mlflow_ema.scored"] == "true"
    assert abs(sum(s["coefficient"] for s in sources) - 1) < 1e-9 and all(
        s["run_id"] == phema.run_id for s in sources
    )
    run = client.get_run(version.run_id)
    curve = {k: v for k, v in run.data.metrics.items() if k.startswith("ema/val_acc/sigma_rel_")}
    assert sorted(curve) == [
        "ema/val_acc/sigma_rel_0.05",
        "ema/val_acc/sigma_rel_0.08",
        "ema/val_acc/sigma_rel_0.1",
    ]
    assert run.data.metrics["chosen_sigma_rel"] == chosen and curve[f"ema/val_acc/sigma_rel_{chosen}"] == max(
        curve.values()
    )
    assert {"posthoc.png", "posthoc.json"} <= {a.path for a in client.list_artifacts(version.run_id)}
    module = mlflow_ema.load_model("models:/digits-phema@candidate")
    assert abs(digits_accuracy(module) - run.data.metrics["ema/val_acc"]) < 1e-6


def test_average_leaves_the_snapshots_out_unless_asked(cli, phema, tmp_path):
    members = json.loads(cli("average", "--run", phema.run_id, "--checkpoint", "last", "--top-k", "50", "--min-k", "1",
                             "--output", str(tmp_path / "a"), "--json"))["members"]  # fmt: skip
    assert [m["kind"] for m in members] == ["ema"]
    asked = json.loads(cli("average", "--run", phema.run_id, "--kind", "posthoc", "--checkpoint", "last",
                           "--top-k", "3", "--output", str(tmp_path / "b"), "--json"))["members"]  # fmt: skip
    assert [m["kind"] for m in asked] == ["posthoc"] * 3 and sorted(m["step"] for m in asked) == [
        500,
        520,
        520,
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--run", "{plain}"), "has no READY post-hoc EMA snapshots (train it with"),
        (("--run", "nope"), "unknown run 'nope'"),
        (("--run", "{run}", "--step", "600"), "target step 600 is beyond the last snapshot (step 520)"),
        (("--run", "{run}", "--sigma-rel", "0.5"), "--sigma-rel must be in (0, 0.2887]"),
        (("--run", "{run}", "--sigma-rel", "a,b"), "--sigma-rel must be comma-separated numbers"),
        (("--run", "{run}", "--register-as", "x"), "--register-as with several --sigma-rel needs --eval"),
        (("--run", "{run}", "--output", "."), "--output . already exists"),
        (("--run", "{run}", "--model", "generator"), "no checkpoint of a model named 'generator'"),
    ],
)
def test_bad_input_to_the_command_is_one_line_and_writes_nothing(cli, phema, args, message):
    before = len(mlflow.search_runs(search_all_experiments=True))
    args = [a.format(plain=phema.plain_id, run=phema.run_id) for a in args]
    output = cli("posthoc", *args, code=1)
    assert output.count("\n") == 1 and message in output, output
    assert len(mlflow.search_runs(search_all_experiments=True)) == before


# -- resume, named models, keep_top_k ------------------------------------------------------------------


def test_resume_restores_the_posthoc_emas_exactly(tracking, digits):
    """A run killed at step 70 and resumed from its checkpoint at step 40 logs the same
    step-80 snapshots as one that was not; of the step-60 snapshots it logged twice, the
    reconstruction uses the later ones."""
    mlflow_ema.autolog(posthoc_every_n_steps=20, log_training_state=True, checkpoint_every_n_steps=40)

    def start():
        model = make_mlp()
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, optimizer = start()
    with mlflow.start_run() as straight:
        train_steps(model, optimizer, digits, 80)
    model, optimizer = start()
    with mlflow.start_run() as killed:
        train_steps(model, optimizer, digits, 70)  # dies after its checkpoint at step 40
        mlflow.end_run("KILLED")
    model, optimizer = start()
    with mlflow.start_run(run_id=killed.info.run_id):
        assert mlflow_ema.resume(model, optimizer).step == 40
        train_steps(model, optimizer, digits, 40, start=40)

    def snapshots(run_id):
        models = [m for m in logged_models(run_id) if m.tags["mlflow_ema.kind"] == "posthoc"]
        return {m.name: mlflow_ema.load_checkpoint(f"models:/{m.model_id}")[0] for m in models}

    expected, resumed = snapshots(straight.info.run_id), snapshots(killed.info.run_id)
    assert sorted(expected) == sorted(
        f"posthoc{s}-step{n}" for s in ("0_05", "0_1") for n in (20, 40, 60, 80)
    )
    assert set(resumed) == set(expected)
    for name in ("posthoc0_05-step80", "posthoc0_1-step80"):
        assert all(torch.equal(resumed[name][k], expected[name][k]) for k in expected[name]), name
    twice = [m for m in logged_models(killed.info.run_id) if m.name == "posthoc0_05-step60"]
    assert len(twice) == 2
    (plan,) = json.loads(run_cli("posthoc", "--run", killed.info.run_id, "--sigma-rel", "0.07", "--json"))
    used = {(c["sigma_rel"], c["step"]): c["model_id"] for c in plan["coefficients"]}
    latest = max(twice, key=lambda m: m.creation_timestamp).model_id
    assert len(plan["coefficients"]) == 8 and used[(0.05, 60)] == latest


def test_watched_models_snapshots_carry_their_name_and_keep_top_k_keeps_them(tracking, digits):
    mlflow_ema.autolog(keep_top_k=1, monitor="ema/val_acc", checkpoint_every_n_steps=10)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mlflow_ema.watch(model, optimizer, name="G", posthoc_every_n_steps=10, posthoc_sigma_rels=[0.06, 0.09])
    with mlflow.start_run() as run:
        for start in range(0, 30, 10):
            train_steps(model, optimizer, digits, 10, start=start)
            mlflow.log_metric("ema/val_acc", 1.0 - start / 100, step=start + 10)
    names = [m.name for m in logged_models(run.info.run_id)]
    assert sorted(n for n in names if "posthoc" in n) == sorted(
        f"G-posthoc{s}-step{n}" for n in (10, 20, 30) for s in ("0_06", "0_09")
    )
    assert "G-ema-step20" not in names  # keep_top_k deleted checkpoints, not snapshots
    (plan,) = json.loads(run_cli("posthoc", "--run", run.info.run_id, "--model", "G", "--sigma-rel", "0.07",
                                 "--output", "out", "--json"))  # fmt: skip
    assert plan["step"] == 30 and len(plan["coefficients"]) == 6
