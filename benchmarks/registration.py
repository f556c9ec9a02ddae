"""Benchmark: registering a soup (``mlflow-ema average --register-as``) against a plain
``mlflow.pytorch.log_model`` + ``mlflow.register_model`` of the same model, where its time goes,
and what the architecture program and an MLmodel per checkpoint cost.

Everything runs in one process, on a sqlite store in a temporary folder (working directory
there, so artifacts go to its ``./mlruns``):

1. **Members.** ``--members`` runs (default 5) of a stack of ``nn.Linear(W, W)`` layers with ReLUs
   (default 10 x 3200: 102.4M parameters, 410 MB in float32; ``--small``: 10 x 1024, 10.5M) are
   trained for a few SGD steps under ``mlflow_ema.autolog()`` inside ``mlflow.start_run()``, all
   from one initial state dict (loaded into each run's model), each logging ``ema/val_acc`` at
   its last step. ``checkpoint_at_end`` then writes each run's raw and EMA checkpoints (two
   LoggedModels) and the architecture folder (``program.pt2`` + ``inputs.json``).
2. **Registration**, timed in ``--rounds`` rounds (default 3): ``mlflow_ema.average_runs(
   AverageOptions(experiments=[...], top_k=members, checkpoint="last", metric="ema/val_acc",
   register_as="soup"))``, split into phases by wrapping the library functions it calls with
   timers (in this script only; nothing of the package is changed): selection, the architecture
   (download, pickle check, ``torch.export.load``), the members' download, the averaging
   (``average_checkpoints``: sizes and the other files' sha256 first, the weight files' sha256
   computed from the bytes it reads, on threads, and waited for at the end), loading the soup's
   weights into the program, the soup run's own logging (params, metrics, the ``soup/``
   checkpoint, written in place in this local store, the chart), ``log_model`` (split into
   signature inference, ``torch.export.export``, ``torch.export.save``, MLflow's validation of the
   serving input example, which loads the saved model back, and the copy to the artifact store)
   and ``register_model``.
3. **Reference**, in the same rounds (the order alternating): ``mlflow.pytorch.log_model`` of the
   user's ``nn.Module`` with the same weights layout, ``serialization_format="pt2"``, the same
   input example and ``pip_requirements`` given (no requirement inference subprocess), then
   ``mlflow.register_model``, in a run of its own. An untimed ``log_model`` + ``register_model``
   of a small model comes first, so neither side pays MLflow's first-call costs.
4. **An MLmodel per checkpoint**: per model (the big stack, the digits MLP 64-32-10 and a digits
   CNN), ``mlflow_ema.save_checkpoint`` of its state dict against ``mlflow.pytorch.save_model``
   (pt2, input example, ``pip_requirements``) of its exported program holding the same weights
   (:func:`mlflow_ema.programs.load_program` then ``load_state_dict``): seconds and bytes, and
   the ratios (``--repeats`` times, default 5, interleaved; medians).
5. **The architecture program**: ``export_model`` (``torch.export`` as the package does it in
   training) and ``torch.export.save`` per model: seconds and the size of ``program.pt2``.

Last, sanity checks: every member run has a READY EMA checkpoint with the metric and a program,
the soup averaged every member, and the registered version (loaded with
``mlflow.pytorch.load_model``) gives the outputs of the model holding the soup run's ``soup/``
checkpoint.

Run from the repository root (several minutes for the full run; about a minute with ``--small``)::

    .venv/bin/python benchmarks/registration.py [--small] [--members 5] [--rounds 3] [--repeats 5]

Exits with status 1 if a sanity check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import print_verdicts  # a sibling module: the scripts run from benchmarks/

os.environ.setdefault("MLFLOW_EMA_STRICT", "1")  # an error of mlflow-ema's own raises, not a warning
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow
import mlflow.pytorch
import torch
from mlflow import MlflowClient
from torch import nn

import mlflow_ema
import mlflow_ema.digests as digests
import mlflow_ema.programs as programs
import mlflow_ema.registry as registry
import mlflow_ema.soup as soup
import mlflow_ema.soup_model as soup_model
import mlflow_ema.workflow as workflow
from mlflow_ema.checkpoint import init_fingerprint, load_checkpoint
from mlflow_ema.inputs import InputSpec, describe_inputs

MB = 1e6
METRIC = "ema/val_acc"
EXPERIMENT = "registration-bench"
SOUP_NAME = "soup"
REFERENCE_NAME = "reference"
BATCH = 8  # training batch; the exported programs' example batch too


# -- models -------------------------------------------------------------------------------


def linear_stack(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < depth - 1 else [])
    return nn.Sequential(*layers)


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def folder_bytes(path: str | os.PathLike) -> int:
    path = Path(path)
    return (
        path.stat().st_size
        if path.is_file()
        else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    )


def requirements() -> list[str]:
    """What ``register_soup`` gives ``log_model``: no requirement inference subprocess."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]


# -- timers -------------------------------------------------------------------------------


class Clock:
    """Seconds per phase from wrapped functions; a call inside another wrapped call is
    booked under ``outer/inner`` (so ``torch.export.load`` is told apart by its caller)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.stack: list[str] = []

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.stack.append(key)
            name = "/".join(self.stack)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.stack.pop()

        return timed

    @contextlib.contextmanager
    def patched(self, targets: list[tuple[Any, str, str]]) -> Iterator[None]:
        """``setattr(obj, attr, wrap(key, getattr(obj, attr)))`` for each target, undone after."""
        saved = []
        try:
            for obj, attr, key in targets:
                fn = getattr(obj, attr)
                saved.append((obj, attr, fn))
                setattr(obj, attr, self.wrap(key, fn))
            yield
        finally:
            for obj, attr, fn in reversed(saved):
                setattr(obj, attr, fn)


def log_model_parts() -> list[tuple[Any, str, str]]:
    """What ``mlflow.pytorch.log_model`` spends its time on (pt2)."""
    import mlflow.models.utils

    return [
        (mlflow.pytorch, "_infer_signature_from_input_example", "signature (a forward)"),
        (torch.export, "export", "torch.export.export"),
        (torch.export, "save", "torch.export.save"),
        (mlflow.models.utils, "_validate_serving_input", "validate serving input (load + predict)"),
        (MlflowClient, "log_model_artifacts", "copy to the artifact store"),
    ]


# Phases of average_runs, in the order they run: (object, attribute, label)
SOUP_PHASES: list[tuple[Any, str, str]] = [
    (workflow, "plan", "select"),
    (workflow, "soup_model", "architecture"),
    (soup_model, "download_architecture", "download"),
    (programs, "check_pickle_free", "pickle check"),
    (torch.export, "load", "torch.export.load"),
    (workflow, "_download", "download members"),
    (workflow, "average_checkpoints", "average"),
    (soup, "_check_before_reading", "sizes, other files' sha256"),
    (digests.MemberReads, "finish", "wait for the sha256 of the bytes read"),
    (registry, "load_weights", "load weights into the program"),
    (workflow, "soup_experiment_id", "soup experiment look-up"),
    (mlflow, "start_run", "soup run start"),
    (registry, "_log_soup", "soup run logging"),
    (registry, "save_checkpoint", "soup/ checkpoint (write, sha256, fsync)"),
    (registry, "_chart", "soup.png chart"),
    (registry, "log_soup_model", "log_model"),
    (mlflow, "register_model", "register_model"),
    (mlflow.tracking.fluent, "end_run", "soup run end"),
    (tempfile.TemporaryDirectory, "cleanup", "temporary folders removed (downloads, architecture)"),
]


# -- 1. members ------------------------------------------------------------------------------


def train_members(args: argparse.Namespace, init: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """``args.members`` runs under autolog from ``init``: a few SGD steps, the metric at the end."""
    mlflow_ema.autolog(checkpoint_at_end=True)
    rows = []
    try:
        for i in range(args.members):
            model = linear_stack(args.width, args.depth)
            model.load_state_dict(init)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3 * (i + 1))
            g = torch.Generator().manual_seed(1000 + i)
            start = time.perf_counter()
            with mlflow.start_run(run_name=f"member-{i}") as run:
                for _ in range(args.steps):
                    x = torch.randn(BATCH, args.width, generator=g)
                    y = torch.randint(0, args.width, (BATCH,), generator=g)
                    loss = nn.functional.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                mlflow.log_metric(METRIC, 0.5 + 0.01 * i, step=args.steps)
                trained = time.perf_counter()
            end = time.perf_counter()
            rows.append({"run_id": run.info.run_id, "train": trained - start, "run_end": end - trained})
            print(f"  member {i}: {args.steps} steps {trained - start:.1f} s, run end (checkpoints, "
                  f"export, upload) {end - trained:.1f} s", flush=True)  # fmt: skip
            del model, opt
            gc.collect()
    finally:
        mlflow_ema.autolog(disable=True)
    return rows


def member_artifacts(run_id: str) -> dict[str, Any]:
    """Sizes of a member run's LoggedModels and architecture folder (local store: no copy)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'", output_format="list")  # fmt: skip
    out: dict[str, Any] = {"models": {}}
    for m in models:
        local = mlflow.artifacts.download_artifacts(artifact_uri=m.artifact_location)
        out["models"][m.tags.get("mlflow_ema.kind", "?")] = {
            "status": str(m.status), "bytes": folder_bytes(local), "metrics": [x.key for x in m.metrics or []],
        }  # fmt: skip
    arch = {
        a.path.rsplit("/", 1)[-1]: a.file_size
        for a in client.list_artifacts(run_id, "mlflow_ema/architecture")
    }
    out["architecture"] = arch
    return out


# -- 2 and 3. registration and reference ----------------------------------------------------------


def register_once(args: argparse.Namespace) -> tuple[float, dict[str, float], Any]:
    clock = Clock()
    options = mlflow_ema.AverageOptions(experiments=[EXPERIMENT], top_k=args.members, checkpoint="last",
                                        metric=METRIC, register_as=SOUP_NAME)  # fmt: skip
    with clock.patched(SOUP_PHASES + log_model_parts()):
        start = time.perf_counter()
        result = mlflow_ema.average_runs(options)
        total = time.perf_counter() - start
    return total, clock.seconds, result


def reference_once(model: nn.Module, example: Any) -> tuple[float, dict[str, float]]:
    clock = Clock()
    log_model = clock.wrap("log_model", mlflow.pytorch.log_model)
    register = clock.wrap("register_model", mlflow.register_model)
    with clock.patched(log_model_parts()):
        start = time.perf_counter()
        with mlflow.start_run(run_name="reference"):
            info = log_model(model, name="model", input_example=example, serialization_format="pt2",
                             pip_requirements=requirements())  # fmt: skip
            register(info.model_uri, REFERENCE_NAME)
        total = time.perf_counter() - start
    return total, clock.seconds


def median_round(rounds: list[tuple[float, dict[str, float]]]) -> tuple[float, dict[str, float]]:
    """The round of median total time (the upper one for an even count): its phases add up."""
    return sorted(rounds, key=lambda r: r[0])[len(rounds) // 2]


def report_registration(
    args: argparse.Namespace,
    soups: list[tuple[float, dict[str, float]]],
    refs: list[tuple[float, dict[str, float]]],
) -> dict[str, float]:
    total, phases = median_round(soups)
    print(
        f"\n### Registration of a soup of {args.members} members (seconds; the median round of {len(soups)})\n"
    )
    print("| phase | seconds | share |")
    print("|---|---:|---:|")
    subs = {
        "architecture": ["download", "pickle check", "torch.export.load"],
        "average": ["sizes, other files' sha256", "wait for the sha256 of the bytes read"],
        "soup run logging": ["soup/ checkpoint (write, sha256, fsync)", "soup.png chart"],
        "log_model": [p[2] for p in log_model_parts()],
    }
    top = [label for obj, attr, label in SOUP_PHASES if label not in {s for v in subs.values() for s in v}]
    booked = 0.0
    for label in top:
        seconds = phases.get(label, 0.0)
        booked += seconds
        print(f"| {label} | {seconds:.2f} | {seconds / total:.0%} |")
        if label in subs:
            rest = seconds
            for sub in subs[label]:
                s = phases.get(f"{label}/{sub}", 0.0)
                rest -= s
                print(f"| &nbsp;&nbsp; {sub} | {s:.2f} | {s / total:.0%} |")
            print(f"| &nbsp;&nbsp; rest of {label} | {rest:.2f} | {rest / total:.0%} |")
    other = total - booked
    print(f"| not wrapped (look-ups, the version's tags) | {other:.2f} | {other / total:.0%} |")
    print(f"| **whole `average_runs`** | **{total:.2f}** | 100% |")
    print(f"\nrounds: {', '.join(f'{t:.1f}' for t, _ in soups)} s")

    ref, ref_phases = median_round(refs)
    print(
        "\n### Reference: `log_model` (pt2) of the `nn.Module` + `register_model` "
        f"(seconds; the median round of {len(refs)})\n"
    )
    print("| phase | reference | in the soup's registration |")
    print("|---|---:|---:|")
    for key in ["log_model", *[f"log_model/{p[2]}" for p in log_model_parts()], "register_model"]:
        name = key.replace("log_model/", "&nbsp;&nbsp; ")
        print(f"| {name} | {ref_phases.get(key, 0.0):.2f} | {phases.get(key, 0.0):.2f} |")
    ref_mlflow = ref_phases.get("log_model", 0.0) + ref_phases.get("register_model", 0.0)
    print(f"| start_run / end_run | {ref - ref_mlflow:.2f} | - |")
    print(f"| **total** | **{ref:.2f}** | **{total:.2f}** |")
    print(f"\nreference rounds: {', '.join(f'{t:.1f}' for t, _ in refs)} s")
    mlflow_part = phases.get("log_model", 0.0) + phases.get("register_model", 0.0)
    print(
        f"\nmlflow-ema's whole registration / reference: {total / ref:.1f}x ({total:.1f} s vs {ref:.1f} s); "
        f"mlflow-ema adds {total - ref:.1f} s: its own log_model + register_model take {mlflow_part:.1f} s "
        f"(the reference {ref_mlflow:.1f} s), the rest ({total - mlflow_part:.1f} s) is selection, architecture, "
        "download, verify, average, loading the weights and the soup run's logging"
    )
    return {"total": total, "reference": ref}


# -- 4 and 5. per-checkpoint MLmodel, and the program ----------------------------------------------


def program_and_mlmodel(
    name: str, model: nn.Module, x: torch.Tensor, folder: Path, repeats: int
) -> dict[str, Any]:
    """Export time and size; save_checkpoint against save_model of the program with the weights."""
    model.eval()
    spec = describe_inputs((x,), {}, model_class=f"{type(model).__module__}:{type(model).__qualname__}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fingerprint = init_fingerprint(state)
    weights = sum(t.numel() * t.element_size() for t in state.values())
    times: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    example = None
    for r in range(repeats):
        start = time.perf_counter()
        program = programs.export_model(model, spec)
        exported = time.perf_counter()
        path = folder / f"{name}-program-{r}.pt2"
        programs.save_program(program, path, weights=False)  # as training writes it
        saved = time.perf_counter()
        times.setdefault("export", []).append(exported - start)
        times.setdefault("program save", []).append(saved - exported)
        sizes["program"] = path.stat().st_size
        del program
        module = programs.load_program(path)
        module.load_state_dict(state)
        if example is None:
            example = soup_model.SoupModel(nn.Identity(), spec, None, "pt2").example_arrays()[0]
        variants = ["checkpoint", "mlmodel"] if r % 2 == 0 else ["mlmodel", "checkpoint"]
        for variant in variants:
            out = folder / f"{name}-{variant}-{r}"
            start = time.perf_counter()
            if variant == "checkpoint":
                mlflow_ema.save_checkpoint(out, state, kind="ema", step=1, init_fingerprint=fingerprint)
            else:
                mlflow.pytorch.save_model(module.program, str(out), serialization_format="pt2",
                                          input_example=example, pip_requirements=requirements())  # fmt: skip
            times.setdefault(variant, []).append(time.perf_counter() - start)
            sizes[variant] = folder_bytes(out)
            shutil.rmtree(out)
        del module
        path.unlink()
        gc.collect()
    return {
        "name": name, "params": n_params(model), "weights": weights, "sizes": sizes,
        "seconds": {k: statistics.median(v) for k, v in times.items()}, "repeats": repeats,
    }  # fmt: skip


def report_models(rows: list[dict[str, Any]]) -> None:
    print(f"\n### An MLmodel per checkpoint: `save_model` (pt2) against `save_checkpoint` (median of "
          f"{rows[0]['repeats']})\n")  # fmt: skip
    print("| model | params | save_checkpoint | bytes | save_model pt2 | bytes | time ratio | bytes ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, b = r["seconds"], r["sizes"]
        print(
            f"| {r['name']} | {fmt_params(r['params'])} | {s['checkpoint']:.3f} s | {fmt_bytes(b['checkpoint'])} "
            f"| {s['mlmodel']:.3f} s | {fmt_bytes(b['mlmodel'])} | {s['mlmodel'] / s['checkpoint']:.1f}x "
            f"| {b['mlmodel'] / b['checkpoint']:.2f}x |"
        )
    print("\n### The architecture program (`export_model` as in training, then `torch.export.save`)\n")
    print(
        "| model | params | weights (fp32) | export | torch.export.save | program.pt2 | program / weights |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s, b = r["seconds"], r["sizes"]
        print(
            f"| {r['name']} | {fmt_params(r['params'])} | {fmt_bytes(r['weights'])} | {s['export']:.3f} s "
            f"| {s['program save']:.3f} s | {fmt_bytes(b['program'])} | {b['program'] / r['weights']:.2f}x |"
        )


def fmt_bytes(n: float) -> str:
    return f"{n / MB:,.1f} MB" if n >= MB else f"{n / 1e3:,.1f} kB"


# -- sanity -----------------------------------------------------------------------------------------


def check_registered(args: argparse.Namespace, result: Any, example: Any) -> tuple[str, bool]:
    """The registered version's outputs equal those of the model holding the soup/ checkpoint."""
    version = result.registered
    loaded = mlflow.pytorch.load_model(f"models:/{SOUP_NAME}/{version.version}")
    local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="soup")
    model = linear_stack(args.width, args.depth).eval()
    model.load_state_dict(load_checkpoint(local).state_dict)
    x = torch.from_numpy(example)
    with torch.no_grad():
        diff = (loaded(x) - model(x)).abs().max().item()
    return (f"sanity: version {version.version} of {SOUP_NAME!r} loads with mlflow.pytorch.load_model and "
            f"gives the soup/ checkpoint's outputs (max |diff| {diff:.1e})", diff <= 1e-5)  # fmt: skip


# -- main -------------------------------------------------------------------------------------------


def load_average() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small", action="store_true", help="10 x Linear(1024, 1024), 10.5M params: a quick run"
    )
    parser.add_argument("--members", type=int, default=5, help="runs averaged (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="registration and reference rounds (default 3)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="repeats of the per-model measurements (default 5)"
    )
    parser.add_argument("--steps", type=int, default=3, help="SGD steps per member run (default 3)")
    parser.add_argument("--tmp", help="where the store goes (default: the system temp folder)")
    args = parser.parse_args()
    args.width, args.depth = (1024, 10) if args.small else (3200, 10)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "Created version ..." lines

    torch.manual_seed(0)
    big = linear_stack(args.width, args.depth)
    init = {k: v.detach().clone() for k, v in big.state_dict().items()}
    weight_bytes = sum(t.numel() * t.element_size() for t in init.values())
    tmp_root = Path(args.tmp or tempfile.gettempdir())
    need = weight_bytes * (3 * args.members + 3 * args.rounds + args.members + 6)
    free = shutil.disk_usage(tmp_root).free
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), mlflow "
          f"{mlflow.__version__}, mlflow-ema {mlflow_ema.__version__}; {load_average()}")  # fmt: skip
    print(f"model: {args.depth} x Linear({args.width}, {args.width}), {fmt_params(n_params(big))} params, "
          f"{fmt_bytes(weight_bytes)} fp32; {args.members} members, {args.rounds} rounds; "
          f"{tmp_root}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.1f} GB")  # fmt: skip
    if free < need:
        raise SystemExit(f"not enough disk space in {tmp_root}")

    tmp = Path(tempfile.mkdtemp(prefix="mlflow-ema-bench-registration-", dir=tmp_root))
    previous = Path.cwd()
    lines: list[tuple[str, bool]] = []
    try:
        os.chdir(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(EXPERIMENT)

        print(
            f"\n1. training {args.members} members ({args.steps} SGD steps each, batch {BATCH}) under autolog"
        )
        members = train_members(args, init)
        arts = [member_artifacts(m["run_id"]) for m in members]
        for i, a in enumerate(arts):
            ema = a["models"].get("ema", {})
            ok = (
                ema.get("status", "").endswith("READY")
                and METRIC in ema.get("metrics", [])
                and ("program.pt2" in a["architecture"] and "inputs.json" in a["architecture"])
            )
            lines.append((f"sanity: member {i} has a READY EMA checkpoint linked to {METRIC} and an "
                          "architecture program", ok))  # fmt: skip
        a0 = arts[0]
        print("\n### Member runs (checkpoint_at_end: raw + EMA checkpoints and the architecture folder)\n")
        print("| run | training steps | run end (snapshot, export, write, upload) | raw checkpoint | EMA checkpoint "
              "| program.pt2 | inputs.json |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|")
        for i, (m, a) in enumerate(zip(members, arts, strict=True)):
            arch = a["architecture"]
            print(f"| member-{i} | {m['train']:.1f} s | {m['run_end']:.1f} s "
                  f"| {fmt_bytes(a['models'].get('raw', {}).get('bytes', 0))} "
                  f"| {fmt_bytes(a['models'].get('ema', {}).get('bytes', 0))} "
                  f"| {fmt_bytes(arch.get('program.pt2') or 0)} | {fmt_bytes(arch.get('inputs.json') or 0)} |")  # fmt: skip
        per_run = sum(x["bytes"] for x in a0["models"].values()) + sum(
            v or 0 for v in a0["architecture"].values()
        )
        print(f"\nstored per member run: {fmt_bytes(per_run)} ({per_run / weight_bytes:.2f}x its weights)")

        spec_file = mlflow.artifacts.download_artifacts(run_id=members[0]["run_id"],
                                                        artifact_path="mlflow_ema/architecture/inputs.json")  # fmt: skip
        # the input example the soup's log_model is given, made the package's way
        spec = InputSpec.from_json(Path(spec_file).read_text())
        example = soup_model.SoupModel(nn.Identity(), spec, None, "pt2").example_arrays()[0]
        print(f"input example: {example.dtype} {list(example.shape)}")

        print(
            "\n2. warm-up: log_model + register_model of the digits MLP (untimed: MLflow's first-call costs)"
        )
        start = time.perf_counter()
        with mlflow.start_run(run_name="warm-up"):
            info = mlflow.pytorch.log_model(digits_mlp(), name="model", input_example=torch.randn(2, 64).numpy(),
                                            serialization_format="pt2", pip_requirements=requirements())  # fmt: skip
            mlflow.register_model(info.model_uri, "warm-up")
        print(f"  {time.perf_counter() - start:.1f} s")

        print(f"\n3. {args.rounds} rounds of the soup's registration and the reference")
        reference_model = linear_stack(args.width, args.depth).eval()
        reference_model.load_state_dict(init)
        soups, refs, result = [], [], None
        for r in range(args.rounds):
            for which in ("soup", "reference") if r % 2 == 0 else ("reference", "soup"):
                if which == "soup":
                    total, seconds, result = register_once(args)
                    soups.append((total, seconds))
                    used = len(result.members)
                    print(f"  round {r + 1} soup: {total:.1f} s, version {result.registered.version} "
                          f"of {used} members", flush=True)  # fmt: skip
                    lines.append((f"sanity: round {r + 1}: the soup averaged all {args.members} members: {used}",
                                  used == args.members))  # fmt: skip
                else:
                    total, seconds = reference_once(reference_model, example)
                    refs.append((total, seconds))
                    print(f"  round {r + 1} reference: {total:.1f} s", flush=True)
                gc.collect()
        del reference_model
        assert result is not None
        summary = report_registration(args, soups, refs)
        lines.append(check_registered(args, result, example))
        del result
        gc.collect()

        print(f"\n4. per model, {args.repeats} repeats: export, save_checkpoint, save_model")
        torch.manual_seed(0)
        rows = []
        for name, model, x in (
            (f"stack {args.depth} x {args.width}", big, torch.randn(BATCH, args.width)),
            ("digits MLP 64-32-10", digits_mlp(), torch.randn(BATCH, 64)),
            ("digits CNN", digits_cnn(), torch.randn(BATCH, 64)),
        ):
            rows.append(program_and_mlmodel(name, model, x, tmp, args.repeats))
            print(f"  {name}: done", flush=True)
        report_models(rows)
        stack = rows[0]
        print(
            f"\nsummary: soup registration {summary['total']:.1f} s = {summary['total'] / summary['reference']:.1f}x "
            f"the reference ({summary['reference']:.1f} s); an MLmodel per checkpoint of the big model: "
            f"{stack['seconds']['mlmodel'] / stack['seconds']['checkpoint']:.1f}x the checkpoint's time, "
            f"{stack['sizes']['mlmodel'] / stack['sizes']['checkpoint']:.2f}x its bytes"
        )
    finally:
        os.chdir(previous)
        mlflow.set_tracking_uri(None)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{load_average()} at the end; removed {tmp}\n")
    return print_verdicts(lines, quick=False)


if __name__ == "__main__":
    sys.exit(main())
