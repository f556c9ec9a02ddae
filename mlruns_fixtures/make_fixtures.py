"""Build the committed MLflow fixture stores, and copy one to where it can be used.

A fixture store is a small MLflow sqlite store (``mlflow.db`` plus its artifacts in
``mlruns/``) holding a finished sweep that exercises ``mlflow-ema`` without training.
One store is kept for each checkpoint-format version ever released, written by the
mlflow-ema of that version: ``mlruns_fixtures/format-v<N>/``. Once committed, a store
is never rebuilt or edited: it is the proof that later versions still read it.

Usage, from the repository root::

    python mlruns_fixtures/make_fixtures.py                # build format-v<N> (current N)
    python mlruns_fixtures/make_fixtures.py --out DIR      # build DIR/format-v<N> instead
    python mlruns_fixtures/make_fixtures.py --force        # rebuild it (only before it is committed)
    python mlruns_fixtures/make_fixtures.py --copy format-v1 /tmp/store
    cd /tmp/store && mlflow-ema ls -e sweep                # (PYTHONPATH=<repo> for --register-as)

Building refuses to overwrite an existing store unless ``--force``. It works in a
temporary folder beside the destination and renames it into place when complete, so
a crash leaves nothing half-written. It takes about 10 seconds.

What the store holds. Experiment ``sweep``; every run trains
``examples.train_digits:build_model(hidden=16)`` for a few epochs on scikit-learn's
bundled digits (no download) with ``mlflow_ema.autolog(checkpoint_every_n_epochs=1,
model_factory=..., model_kwargs={"hidden": 16})``, and logs ``val_acc`` and, inside
``mlflow_ema.swap()``, ``ema/val_acc`` after each epoch, so autolog links them to that
epoch's raw and EMA checkpoints (LoggedModels ``raw-step<N>`` / ``ema-step<N>``). The
runs (name: what it is for):

- ``good-a``, ``good-b``, ``good-c``: FINISHED, same initial weights, three checkpoints
  each (other-init too, the other runs two); at least one has its best EMA checkpoint
  before its last, so ``--checkpoint best`` and ``last`` (and ``--run``) differ.
  Averaging them works. From format 2 on, ``good-a``'s checkpoints are sharded (a 2 KB
  ``max_shard_size``: four shards, one holding a single tensor larger than the limit, and
  ``model.safetensors.index.json``), so averaging mixes layouts: the script gives that run ``autolog(max_shard_size=2048)``.
- ``other-init``: FINISHED, another initialization (another
  ``mlflow_ema.init_fingerprint``) and the best ``ema/val_acc`` of all, so it ranks
  first and averaging must refuse it unless ``--allow-different-init``.
- ``corrupt``: FINISHED, same init; after upload, bytes of its best EMA checkpoint's
  stored ``model.safetensors`` were flipped (same size, the sha256 no longer matches
  the manifest), so averaging it must fail naming the run.
- ``failed``: FAILED (raised during training) after logging good checkpoints: left
  out by the default ``--status FINISHED``.
- ``no-metric``: FINISHED, its EMA checkpoints have no ``ema/val_acc`` (only the raw
  ones have ``val_acc``): left out of a ranking by ``ema/val_acc``.
- ``deleted``: FINISHED, then ``mlflow.delete_run``: left out (MLflow hides it).

The build checks these properties (no ties among the values that rank runs, the
excluded runs would otherwise rank above a good run, ...) and fails if one does not
hold. Every run carries the tag ``fixture_role`` (good, other-init, corrupt, failed,
no-metric, deleted) for ``--filter "tags.fixture_role = 'good'"``.

``fixture.json`` records what tests need without hard-coding ids: the checkpoint
format version, the mlflow, mlflow-ema and torch versions, the alembic schema
revision of ``mlflow.db``, and per run its role, run id, status and checkpoints
(model id, step, the metric values the script logged for it, the sha256 of its stored
weights: ``weights_digest``, the sha256 of ``model.safetensors``, or for sharded weights
(format 2: ``"sharded": true``) the sha256 of the shards' ``sha256sum`` listing).

Artifact locations. A sqlite store records absolute artifact paths
(``experiments.artifact_location``, ``runs.artifact_uri``,
``logged_models.artifact_location``); MLflow resolves relative ones against the working
directory of whoever reads the store, so they break as soon as the CLI runs elsewhere.
The committed ``mlflow.db`` therefore holds the placeholder ``/MLFLOW_EMA_FIXTURE_ROOT``
instead of the folder it was built in, and :func:`copy_store` (``--copy``) copies a
store and replaces the placeholder with the copy's absolute path in every text column:
the copy is then an ordinary store that works from any working directory. Never use a
committed store in place: MLflow may upgrade its schema, and averaging writes to it.

Determinism. Every seed is fixed and the numerics are pinned before torch is imported
(``ATEN_CPU_CAPABILITY=default``, ``MKL_CBWR=COMPATIBLE``, one thread), because
otherwise matrix products and reductions round differently on CPUs with other vector
units. With the same torch version on x86-64, a rebuild writes byte-identical
checkpoint files (same sha256s). Run ids, model ids, timestamps and the git commit tag
differ from build to build; tests read them from ``fixture.json``.

When to add a store. When ``FORMAT_VERSION`` in ``mlflow_ema/checkpoint.py`` changes,
run this script (it builds ``format-v<new N>``) and commit the new folder next to the
old ones; ``tests/test_fixtures.py`` picks up every ``format-v*`` folder, and its
determinism test fails until the store for the current format exists. Keep
``mlruns_fixtures/`` under 5 MB in all (``du -sh mlruns_fixtures``; a store takes about
1.3 MB on disk, its database vacuumed with 1 KiB pages).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PLACEHOLDER = "/MLFLOW_EMA_FIXTURE_ROOT"
EXPERIMENT = "sweep"
FACTORY = "examples.train_digits:build_model"
MODEL_KWARGS = {"hidden": 16}
METRIC = "val_acc"  # logged as val_acc (raw weights) and ema/val_acc (EMA weights)
DECAY = 0.99
BATCH = 64
# Read by torch and MKL when they start: the same bits on every x86-64 CPU.
NUMERICS = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One run of the fixture sweep."""

    name: str
    role: str
    lr: float
    data_seed: int
    init_seed: int = 0
    epochs: int = 2
    ema_metric: bool = True  # log ema/val_acc
    fail: bool = False  # raise inside the run: FAILED
    delete: bool = False  # mlflow.delete_run afterwards
    corrupt: bool = False  # flip bytes of the best EMA checkpoint after upload
    max_shard_size: int | None = None  # autolog(max_shard_size=...) for this run


RUNS = [  # seeds, learning rates and lengths chosen so that the properties _check_design tests hold
    Spec("good-a", "good", lr=0.2, data_seed=4, epochs=3, max_shard_size=2048),  # best EMA: epoch 2 of 3
    Spec("good-b", "good", lr=0.1, data_seed=1, epochs=3),
    Spec("good-c", "good", lr=0.3, data_seed=1, epochs=3),
    Spec("other-init", "other-init", lr=0.2, data_seed=3, init_seed=1, epochs=3),  # the best of all
    Spec("corrupt", "corrupt", lr=0.1, data_seed=6, corrupt=True),
    Spec("failed", "failed", lr=0.1, data_seed=5, fail=True),
    Spec("no-metric", "no-metric", lr=0.1, data_seed=3, ema_metric=False),
    Spec("deleted", "deleted", lr=0.2, data_seed=8, delete=True),
]


class FixtureError(Exception):
    """The store cannot be built, or does not have the properties it is documented to have."""


# -- using a store ---------------------------------------------------------------------------


def copy_store(store: str | os.PathLike, dest: str | os.PathLike) -> dict:
    """Copy the fixture store ``store`` (e.g. ``mlruns_fixtures/format-v1``) to ``dest``
    (new or empty) and point its artifact locations at the copy. Returns ``fixture.json``.

    The copy is an ordinary MLflow store: ``cd dest && mlflow-ema ls -e sweep`` uses it as
    the default store (``sqlite:///mlflow.db``), and ``--tracking-uri sqlite:///<dest>/mlflow.db``
    works from anywhere. Its schema is not upgraded.
    """
    store, dest = Path(store), Path(dest).resolve()
    if not (store / "mlflow.db").is_file() or not (store / "fixture.json").is_file():
        raise FixtureError(f"{store} is not a fixture store (no mlflow.db and fixture.json)")
    if dest.exists() and any(dest.iterdir()):
        raise FixtureError(f"{dest} is not empty")
    shutil.copytree(store, dest, dirs_exist_ok=True)
    replace_in_database(dest / "mlflow.db", PLACEHOLDER, dest.as_posix())
    return json.loads((dest / "fixture.json").read_text())


def replace_in_database(db: Path, old: str, new: str) -> int:
    """Replace ``old`` with ``new`` in every text value of every table; returns the number
    of values changed. Paths may sit in any column (and future MLflow schemas add some)."""
    changed = 0
    with sqlite3.connect(db) as connection:
        tables = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            for column in [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]:
                cursor = connection.execute(
                    f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                    f'WHERE typeof("{column}") = \'text\' AND instr("{column}", ?) > 0',
                    (old, new, old),
                )
                changed += cursor.rowcount
    connection.close()
    return changed


def schema_revision(db: Path) -> str | None:
    """The alembic revision ``mlflow.db`` records (what ``mlflow db upgrade`` starts from)."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    finally:
        connection.close()
    return rows[0][0] if rows else None


def sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


# -- building a store --------------------------------------------------------------------------


def build(out: Path, *, force: bool = False) -> Path:
    """Build ``out/format-v<N>`` for the current checkpoint format N; returns its path."""
    pinned = all(os.environ.get(k) == v for k, v in NUMERICS.items())
    if "torch" not in sys.modules:
        os.environ.update(NUMERICS)
        pinned = True
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # examples.train_digits, and this checkout's mlflow_ema
    from mlflow_ema.checkpoint import FORMAT_VERSION

    out = out.resolve()
    target = out / f"format-v{FORMAT_VERSION}"
    if target.exists() and not force:
        raise FixtureError(
            f"{target} exists: a committed store is kept forever. --force rebuilds it "
            "(only for a store that was never committed)"
        )
    if not pinned:
        raise FixtureError("build in a fresh process: torch was imported before the numerics were pinned")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=out))
    cwd = Path.cwd()
    try:
        os.chdir(staging)  # MLflow's default artifact root is ./mlruns
        info = _record_sweep(staging)
        os.chdir(cwd)
        _seal(staging, info)
        if target.exists():  # --force: swap, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=out))
            os.rename(target, old / target.name)
            os.rename(staging, target)
            shutil.rmtree(old)
        else:
            os.rename(staging, target)
    except BaseException:
        os.chdir(cwd)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _digits():
    """scikit-learn's bundled digits as tensors: a fixed 80/20 train/validation split."""
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _record_sweep(staging: Path) -> dict:
    import mlflow
    import torch
    from mlflow import MlflowClient

    import mlflow_ema
    from examples.train_digits import build_model
    from mlflow_ema._version import __version__
    from mlflow_ema.checkpoint import FORMAT_VERSION

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        os.environ.pop(key, None)
    mlflow.set_tracking_uri(f"sqlite:///{staging / 'mlflow.db'}")
    experiment_id = mlflow.set_experiment(EXPERIMENT).experiment_id
    x_train, y_train, x_val, y_val = _digits()

    @torch.no_grad()
    def accuracy(model) -> float:
        model.eval()
        value = (model(x_val).argmax(dim=1) == y_val).double().mean().item()
        model.train()
        return value

    client = MlflowClient()
    runs = {}
    for spec in RUNS:
        mlflow_ema.autolog(
            decay=mlflow_ema.WarmupDecay(decay=DECAY, power=3 / 4),
            checkpoint_every_n_epochs=1,
            model_factory=FACTORY,
            model_kwargs=MODEL_KWARGS,
            max_shard_size=spec.max_shard_size or "5GB",  # good-a: sharded checkpoints
        )
        torch.manual_seed(spec.init_seed)
        model = build_model(**MODEL_KWARGS)
        optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x_train, y_train),
            batch_size=BATCH,
            shuffle=True,
            generator=torch.Generator().manual_seed(spec.data_seed),
        )
        tags = {
            "fixture_role": spec.role,
            "mlflow.user": "mlflow-ema-fixtures",
            "mlflow.source.name": "mlruns_fixtures/make_fixtures.py",
        }
        logged: dict[int, dict[str, float]] = {}  # epoch -> what this script logged
        run_id = None
        try:
            with mlflow.start_run(run_name=spec.name, tags=tags) as run:
                run_id = run.info.run_id
                mlflow.log_params(
                    {**dataclasses.asdict(spec), **MODEL_KWARGS, "batch": BATCH, "decay": DECAY}
                )
                for epoch in range(1, spec.epochs + 1):
                    for xb, yb in loader:  # exhausting the loader ends an epoch: autolog checkpoints
                        loss = torch.nn.functional.cross_entropy(model(xb), yb)
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                    logged[epoch] = {METRIC: accuracy(model)}
                    mlflow.log_metric(METRIC, logged[epoch][METRIC], step=epoch)
                    if spec.ema_metric:
                        with mlflow_ema.swap():  # logged as ema/val_acc, linked to the EMA checkpoint
                            logged[epoch]["ema/" + METRIC] = accuracy(model)
                            mlflow.log_metric(METRIC, logged[epoch]["ema/" + METRIC], step=epoch)
                if spec.fail:
                    raise _Diverged(spec.name)
        except _Diverged:
            pass
        if not mlflow_ema.flush(timeout=300):
            raise FixtureError("checkpoints were still uploading after 300 s")
        runs[spec.name] = _describe_run(client, experiment_id, spec, run_id, logged)
        if spec.delete:
            client.delete_run(run_id)
            runs[spec.name]["deleted"] = True
    mlflow_ema.autolog(disable=True)
    for spec in RUNS:
        if spec.corrupt:
            _corrupt_best(runs[spec.name], staging)
    if (staging / "mlflow-ema-unsent").exists():
        raise FixtureError("some checkpoints could not be uploaded (see mlflow-ema-unsent/)")
    _check_design(runs)
    mlflow.set_tracking_uri(None)
    return {
        "format_version": FORMAT_VERSION,
        "mlflow_version": mlflow.__version__,
        "mlflow_ema_version": __version__,
        "torch_version": torch.__version__,
        "numerics": NUMERICS,
        "schema_revision": schema_revision(staging / "mlflow.db"),
        "experiment": EXPERIMENT,
        "experiment_id": experiment_id,
        "metric": "ema/" + METRIC,
        "model_factory": FACTORY,
        "model_kwargs": MODEL_KWARGS,
        "artifact_root_placeholder": PLACEHOLDER,
        "runs": runs,
    }


class _Diverged(RuntimeError):
    pass


def _describe_run(client, experiment_id: str, spec: Spec, run_id: str, logged: dict) -> dict:
    """The run as fixture.json records it; checks autolog linked what was logged."""
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    checkpoints = []
    for model in sorted(models, key=lambda m: (int(m.tags["mlflow_ema.step"]), m.tags["mlflow_ema.kind"])):
        kind, step = model.tags["mlflow_ema.kind"], int(model.tags["mlflow_ema.step"])
        epoch = int(model.tags["mlflow_ema.epoch"])
        expected = {k: v for k, v in logged[epoch].items() if k.startswith("ema/") == (kind == "ema")}
        linked = {m.key: m.value for m in model.metrics or []}
        if linked != expected or str(model.status) != "READY":
            raise FixtureError(
                f"{spec.name} {model.name}: {model.status}, linked {linked}, logged {expected}"
            )
        checkpoints.append(
            {
                "name": model.name,
                "model_id": model.model_id,
                "kind": kind,
                "step": step,
                "epoch": epoch,
                "metrics": expected,
                "artifact_location": model.artifact_location,  # made relative in _seal
                "sha256": model.tags["mlflow_ema.sha256"],  # weights_digest as uploaded
                "corrupt": False,
                "sharded": (Path(model.artifact_location) / "model.safetensors.index.json").exists(),
            }
        )
    if len(checkpoints) != 2 * spec.epochs:
        raise FixtureError(f"{spec.name} logged {len(checkpoints)} checkpoints, expected {2 * spec.epochs}")
    fingerprints = {m.tags["mlflow_ema.init_fingerprint"] for m in models}
    if len(fingerprints) != 1:
        raise FixtureError(f"{spec.name}: checkpoints with several init fingerprints {fingerprints}")
    return {
        "role": spec.role,
        "run_id": run_id,
        "init_fingerprint": fingerprints.pop(),
        "status": run.info.status,
        "deleted": False,
        "params": {k: str(v) for k, v in dataclasses.asdict(spec).items()},
        "checkpoints": checkpoints,
    }


def best_checkpoint(run: dict, metric: str = "ema/val_acc") -> dict | None:
    """The checkpoint with the highest ``metric`` (the latest among equals, as ``ls`` picks it)."""
    scored = [c for c in run["checkpoints"] if metric in c["metrics"]]
    return max(scored, key=lambda c: (c["metrics"][metric], c["step"])) if scored else None


def weights_sha256(folder: Path) -> str:
    """What ``weights_digest`` records, from the stored files: the sha256 of
    ``model.safetensors``, or of the shards' ``sha256sum`` listing (sorted by name)."""
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if not shards:
        return sha256(folder / "model.safetensors")
    return hashlib.sha256("".join(f"{sha256(f)}  {f.name}\n" for f in shards).encode()).hexdigest()


def _corrupt_best(run: dict, staging: Path) -> None:
    """Flip bytes of the stored weights of the run's best EMA checkpoint: same size, so
    loading fails on the sha256 (not as a truncated file)."""
    checkpoint = best_checkpoint(run)
    file = Path(checkpoint["artifact_location"]) / "model.safetensors"
    if staging not in file.parents:
        raise FixtureError(f"{file} is not inside the store being built")
    data = bytearray(file.read_bytes())
    for i in range(len(data) - 8, len(data)):  # the last weights, not the header
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))
    checkpoint["corrupt"] = True


def _check_design(runs: dict) -> None:
    """The properties the docstring promises, so tests can rely on them."""
    best = {name: best_checkpoint(run) for name, run in runs.items()}
    value = {name: c["metrics"]["ema/val_acc"] for name, c in best.items() if c is not None}
    ranked = [n for n in runs if runs[n]["role"] in ("good", "other-init", "corrupt")]
    values = sorted(value[n] for n in ranked)
    problems = []
    if len(set(values)) != len(values):
        problems.append(f"ties among the best ema/val_acc of {ranked}: {values}")
    if max(ranked, key=value.get) != "other-init":
        problems.append(f"other-init does not rank first: {value}")
    weakest_good = min(value[n] for n in ranked if runs[n]["role"] == "good")
    for name in ("failed", "deleted"):
        if value[name] <= weakest_good:
            problems.append(f"{name} ({value[name]}) would not rank above a good run ({weakest_good})")
    if best["no-metric"] is not None:
        problems.append("no-metric has ema/val_acc")
    if not any(
        best[n]["step"] != runs[n]["checkpoints"][-1]["step"] for n in ranked if runs[n]["role"] == "good"
    ):
        problems.append("every good run's best EMA checkpoint is its last: --checkpoint best == last")
    fingerprints = {n: run["init_fingerprint"] for n, run in runs.items()}
    if (
        len({f for n, f in fingerprints.items() if n != "other-init"}) != 1
        or fingerprints["other-init"] == fingerprints["good-a"]
    ):
        problems.append(f"init fingerprints are not as designed: {fingerprints}")
    sharded = [c for spec in RUNS if spec.max_shard_size for c in runs[spec.name]["checkpoints"]]
    if not sharded or not all(c["sharded"] for c in sharded):
        problems.append("no run has sharded checkpoints")
    if not any(best[n]["sharded"] for n in ranked if runs[n]["role"] == "good"):
        problems.append("no good run's best EMA checkpoint is sharded: averaging does not mix layouts")
    if runs["failed"]["status"] != "FAILED" or any(
        r["status"] != "FINISHED" for n, r in runs.items() if n != "failed"
    ):
        problems.append(f"statuses: {[(n, r['status']) for n, r in runs.items()]}")
    if problems:
        raise FixtureError("the sweep does not have the documented properties: " + "; ".join(problems))


def _seal(staging: Path, info: dict) -> None:
    """Placeholder for the build folder, relative artifact paths in fixture.json, a vacuumed
    database with small pages, and fixture.json."""
    db = staging / "mlflow.db"
    root = staging.as_posix()
    replace_in_database(db, root, PLACEHOLDER)
    connection = sqlite3.connect(db, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = DELETE")
        connection.execute("PRAGMA page_size = 1024")  # ~65 mostly empty tables: 1 KiB pages, not 4
        connection.execute("VACUUM")
    finally:
        connection.close()
    if root.encode() in db.read_bytes():
        raise FixtureError(f"{db} still mentions {root}")
    if list((staging / "mlruns").glob("*/meta.yaml")):  # MLflow would take ./mlruns for a file store
        raise FixtureError(f"{staging / 'mlruns'} looks like an MLflow file store")
    for run in info["runs"].values():
        for c in run["checkpoints"]:
            location = Path(c["artifact_location"])
            c["artifact_location"] = location.relative_to(staging).as_posix()
            c["stored_sha256"] = weights_sha256(location)
            if (c["stored_sha256"] == c["sha256"]) == c["corrupt"]:
                raise FixtureError(f"{location}: stored vs uploaded sha256 disagrees with corrupt={c['corrupt']}")
            if (location / "model.safetensors.index.json").exists() != c["sharded"]:
                raise FixtureError(f"{location}: sharded={c['sharded']} is not what is stored")
    for leftover in ("mlflow-ema-unsent", ".trash"):
        shutil.rmtree(staging / leftover, ignore_errors=True)
    for folder, _dirs, files in os.walk(staging):  # the temporary folders were private (0700)
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    (staging / "fixture.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=HERE, help="folder to build format-v<N> in (default: here)"
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild an existing store (never a committed one)"
    )
    parser.add_argument(
        "--copy",
        nargs=2,
        metavar=("STORE", "DEST"),
        help="copy fixture STORE (e.g. format-v1) to a usable DEST",
    )
    args = parser.parse_args(argv)
    try:
        if args.copy:
            store = Path(args.copy[0])
            store = store if store.exists() else HERE / store
            info = copy_store(store, Path(args.copy[1]))
            print(
                f"copied {store} (format {info['format_version']}, MLflow {info['mlflow_version']}) to {args.copy[1]}"
            )
        else:
            target = build(args.out, force=args.force)
            print(f"built {target}")
    except FixtureError as e:
        print(f"make_fixtures: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
