"""The main job: the whole story on scikit-learn's digits, on the embedded MLflow store.

1. pretrain a base network (``examples/train_digits.py`` under ``mlflow_ema.autolog()``);
2. fine-tune six runs from the base's best EMA checkpoint, with different learning
   rates, seeds and augmentations, each logging raw and EMA checkpoints;
3. ``mlflow-ema average --top-k 5 --register-as digits-soup --alias candidate`` (uniform
   soup), then ``mlflow-ema promote digits-soup --from-alias candidate --to champion
   --if-better ema/val_acc``;
4. the same with ``--strategy greedy``: the greedy soup becomes the champion only if
   its validation accuracy beats the uniform soup's;
5. post-hoc EMA: the third fine-tuning run also snapshotted two power-function EMAs
   (``--posthoc-every-n-steps``); ``mlflow-ema posthoc --run <its id> --eval ...`` prints
   the validation accuracy of its EMA reconstructed at several lengths, and the best;
6. load ``models:/digits-soup@champion`` and print one table of test accuracy (digits
   held out from training, checkpoint ranking and soup scoring): the best single run's
   raw and EMA weights, the uniform soup and the greedy soup.

    python examples/digits_soup.py          # about 2 minutes on 2 CPU cores

Everything goes to the tracking URI MLflow is given (by default ``./mlflow.db`` and
``./mlruns`` in the working directory); see it with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``. Run it again in the same folder
and it adds a new base, sweep and model versions beside the old ones (the averaging
selects by ``params.init_from``, so sweeps never mix); the champion moves only if the
new soup is better.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

# (learning rate, seed, augmentation) of each fine-tuning run
SWEEP = [
    (0.01, 1, "none"),
    (0.02, 2, "shift"),
    (0.05, 3, "noise"),
    (0.01, 4, "shift"),
    (0.02, 5, "noise"),
    (0.05, 6, "none"),
]
EVAL = "examples.train_digits:val_accuracy"
POSTHOC_EVERY = 25  # steps between post-hoc EMA snapshots of one fine-tuning run:
POSTHOC_RUN = 3  # the third (lr 0.05, noise), whose weights move the most


def step(n: int, text: str) -> None:
    print(f"\n[{n}/6] {text}", flush=True)


def quote(arg: str) -> str:
    """Shell quoting that reads well: "params.x = 'y'" rather than shlex's '"'"' runs."""
    if shlex.quote(arg) == arg or any(c in arg for c in '"$`\\!'):
        return shlex.quote(arg)
    return f'"{arg}"'


def mlflow_ema_cli(*args: str) -> None:
    """Run ``mlflow-ema ARGS`` as a user would, showing the command and its output."""
    print("$ mlflow-ema " + " ".join(map(quote, args)), flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run([sys.executable, "-m", "mlflow_ema.cli", *args], env=env)
    if done.returncode != 0:
        sys.exit(f"digits_soup: `mlflow-ema {args[0]}` failed (exit code {done.returncode})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="digits")
    parser.add_argument("--model-name", default="digits-soup", help="registered model for the soups")
    parser.add_argument("--base-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each fine-tuning run")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    started = time.monotonic()

    def elapsed() -> str:
        return f"{time.monotonic() - started:5.0f} s"

    # the steps below report their own progress; MLflow's per-file download bars only add noise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    print("importing torch and mlflow ...", flush=True)
    import mlflow

    from examples import train_digits
    from mlflow_ema.selection import select

    uri = mlflow.get_tracking_uri()
    print(f"tracking URI: {uri}")
    if uri.startswith(("http://", "https://")):  # fail now, not after MLflow's minutes of retries
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
        except OSError as e:
            sys.exit(f"digits_soup: cannot reach the tracking server at {uri} ({e})")
    step(1, f"pretraining the base network ({args.base_epochs} epochs)")
    base_run = train_digits.main(
        ["--experiment", args.experiment, "--run-name", "base", "--epochs", str(args.base_epochs), "--quiet"]
    )
    (base,) = select(run_id=base_run, kind="ema", metric="ema/val_acc", top_k=1, min_k=1).candidates
    init_from = f"models:/{base.model_id}"
    print(
        f"  base run {base_run}: best EMA checkpoint {base.name}, ema/val_acc {base.value:.4f}  {elapsed()}"
    )

    step(2, f"fine-tuning {len(SWEEP)} runs from {init_from} ({args.epochs} epochs each)")
    posthoc_run = None
    for i, (lr, seed, how) in enumerate(SWEEP, 1):
        name = f"ft-lr{lr}-seed{seed}-{how}"
        posthoc = ["--posthoc-every-n-steps", str(POSTHOC_EVERY)] if i == POSTHOC_RUN else []
        run_id = train_digits.main(
            ["--experiment", args.experiment, "--run-name", name, "--init-from", init_from, "--lr", str(lr),
             "--seed", str(seed), "--augment", how, "--epochs", str(args.epochs), "--quiet", *posthoc]
        )  # fmt: skip
        posthoc_run = run_id if i == POSTHOC_RUN else posthoc_run
        metrics = mlflow.get_run(run_id).data.metrics
        print(
            f"  [{i}/{len(SWEEP)}] {name:<24} val_acc {metrics['val_acc']:.4f}  "
            f"ema/val_acc {metrics['ema/val_acc']:.4f}  {elapsed()}",
            flush=True,
        )

    # Only this sweep: a second invocation in the same folder starts from another base.
    selection = ["--experiment", args.experiment, "--filter", f"params.init_from = '{init_from}'"]
    # The runs recorded their architecture (a torch.export program): registering needs none
    # of this code; --eval names the scoring function, code the user chooses to run.
    candidate = ["--top-k", str(args.top_k), "--eval", EVAL]
    candidate += ["--register-as", args.model_name]
    promote = ["promote", args.model_name, "--from-alias", "candidate", "--to", "champion"]
    versions = {}
    for n, strategy in ((3, "uniform"), (4, "greedy")):
        step(n, f"{strategy} soup of the top {args.top_k}, registered and promoted if better")
        mlflow_ema_cli("average", *selection, "--strategy", strategy, *candidate, "--alias", "candidate")
        versions[strategy] = mlflow.MlflowClient().get_model_version_by_alias(args.model_name, "candidate")
        mlflow_ema_cli(*promote, "--if-better", "ema/val_acc")
        print(f"  {elapsed()}")

    step(5, f"post-hoc EMA: the EMA of run {posthoc_run} at other lengths, chosen after training")
    mlflow_ema_cli("posthoc", "--run", posthoc_run, "--eval", EVAL, "--metric", "ema/val_acc")
    print(f"  {elapsed()}")

    step(6, f"loading models:/{args.model_name}@champion and scoring on the held-out test digits")
    print_table(args, selection_filter=f"params.init_from = '{init_from}'", versions=versions)
    if uri == f"sqlite:///{Path.cwd() / 'mlflow.db'}":
        uri = "sqlite:///mlflow.db"
    if uri.startswith(("http://", "https://")):
        print(f"\ndone in {elapsed().strip()}; see it at {uri}")
    else:
        print(f"\ndone in {elapsed().strip()}; look at it with: mlflow ui --backend-store-uri {uri}")


def print_table(args: argparse.Namespace, *, selection_filter: str, versions: dict) -> None:
    import mlflow

    import mlflow_ema
    from examples.train_digits import build_model, digits_splits, test_accuracy, val_accuracy
    from mlflow_ema import load_checkpoint
    from mlflow_ema.selection import select

    client = mlflow.MlflowClient()
    rows = []
    for kind, metric in (("raw", "val_acc"), ("ema", "ema/val_acc")):
        (best,) = select(
            experiments=[args.experiment], filter_string=selection_filter, kind=kind, metric=metric, top_k=1
        ).candidates
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{best.model_id}", dst_path=tmp)
            state_dict, _ = load_checkpoint(path)
        model = build_model()
        model.load_state_dict(state_dict)
        what = "raw weights" if kind == "raw" else "EMA weights"
        rows.append((f"best single run, {what}", f"{best.run_name} {best.name}", model))
    for strategy, version in versions.items():
        sources = len(json.loads(version.tags["mlflow_ema.sources"]))
        label = f"{strategy} soup ({sources} of {args.top_k})"
        model = mlflow_ema.load_model(f"models:/{args.model_name}/{version.version}")
        rows.append((label, f"{args.model_name} version {version.version}", model))
    champion_uri = f"models:/{args.model_name}@champion"
    champion = client.get_model_version_by_alias(args.model_name, "champion")
    # mlflow.pytorch.load_model works too (a GraphModule, whose .eval() raises: it is one already)
    champion_model = mlflow_ema.load_model(champion_uri)
    if champion.version not in {v.version for v in versions.values()}:  # an earlier job's soup held on
        rows.append(("champion from an earlier run", f"{args.model_name} version {champion.version}", None))

    test_size = len(digits_splits()["test"][1])
    print(
        f"\ntest accuracy on {test_size} held-out digits (not used for training, ranking or soup scoring)\n"
    )
    header = ("model", "from", "val acc", "test acc", "")
    table = [header]
    for label, source, model in rows:
        is_champion = source == f"{args.model_name} version {champion.version}"
        model = champion_model if is_champion else model  # the champion row: what models:/...@champion loads
        mark = f"<- {champion_uri}" if is_champion else ""
        table.append((label, source, f"{val_accuracy(model):.4f}", f"{test_accuracy(model):.4f}", mark))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
