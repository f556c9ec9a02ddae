"""The Lightning callback: real training on digits, a real sqlite MLflow store, no mocks."""

from __future__ import annotations

import importlib.metadata
import json
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from helpers import logged_models
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mlflow_ema
from mlflow_ema import EMA, WarmupDecay, load_checkpoint
from mlflow_ema.lightning import RUN_TAG_MODEL_HPARAMS, EMACallback
from mlflow_ema.tags import RUN_TAG_MODEL_CLASS
from mlflow_ema.tracking import _SESSION

TRAIN_BATCHES = 15  # 1437 training digits in batches of 96


class DigitsNet(pl.LightningModule):
    """An MLP with BatchNorm (float and integer buffers) that records what validation sees."""

    def __init__(self, hidden: int = 32, lr: float = 0.01, fail_at_validation: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        self.validated_with: list[dict[str, torch.Tensor]] = []  # weights at each validation pass
        self.trained_in_eval_mode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.trained_in_eval_mode |= not all(m.training for m in self.modules())
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        if self.trainer.sanity_checking:
            return
        if batch_idx == 0:
            self.validated_with.append(clone(self.state_dict()))
        if self.hparams.fail_at_validation == len(self.validated_with):
            raise RuntimeError("validation failed on purpose")
        x, y = batch
        self.log("val_acc", (self(x).argmax(dim=1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class Recorder(pl.Callback):
    """What happened during fit, seen from outside the EMA callback."""

    def __init__(self) -> None:
        self.optimizer_steps = 0
        self.raw: dict[str, torch.Tensor] = {}  # the weights after the last training batch
        self.epoch_end_steps: list[int] = []
        self.ema_at_validation: list[dict[str, torch.Tensor]] = []
        self.validation_ends = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.optimizer_steps += 1

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.raw = clone(pl_module.state_dict())

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_end_steps.append(trainer.global_step)

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.ema_at_validation.append(clone(ema_callback(trainer).ema.model_state_dict()))

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validation_ends += 1


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ema_callback(trainer: pl.Trainer) -> EMACallback:
    (callback,) = [cb for cb in trainer.callbacks if isinstance(cb, EMACallback) and cb.ema is not None]
    return callback


def ema_callbacks(trainer: pl.Trainer) -> list[EMACallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, EMACallback)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and steadier when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def loaders(digits):
    """A fixed 80/20 split; training batches in a fixed order, so runs are reproducible."""
    x, y = digits
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    train = TensorDataset(x[order[:cut]], y[order[:cut]])
    val = TensorDataset(x[order[cut:]], y[order[cut:]])
    return DataLoader(train, batch_size=96), DataLoader(val, batch_size=512)


def make_model(seed: int = 0, **hparams) -> DigitsNet:
    torch.manual_seed(seed)
    return DigitsNet(**hparams)


def make_trainer(**kwargs) -> pl.Trainer:
    options = {
        "max_epochs": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "logger": False,
        **kwargs,
    }
    return pl.Trainer(**options)


def mlflow_logger(uri: str, run_id: str | None = None) -> MLFlowLogger:
    return MLFlowLogger(experiment_name="lightning", tracking_uri=uri, run_id=run_id)


def kinds_and_steps(run_id: str) -> list[tuple[str, int]]:
    return [(m.tags["mlflow_ema.kind"], int(m.tags["mlflow_ema.step"])) for m in logged_models(run_id)]


def download(model, tmp_path: Path):
    dst = tmp_path / "dl" / model.model_id
    dst.mkdir(parents=True)
    return load_checkpoint(
        mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(dst))
    )


@torch.no_grad()
def accuracy(state: dict[str, torch.Tensor], loader: DataLoader) -> float:
    model = DigitsNet()
    model.load_state_dict(state)
    model.eval()
    ((x, y),) = list(loader)
    return (model(x).argmax(dim=1) == y).float().mean().item()


# -- 1. checkpoints, metrics and run tags in MLflow ------------------------------------------------


def test_raw_and_ema_checkpoints_per_epoch_with_linked_raw_and_ema_metrics(tracking, loaders, tmp_path):
    callback, recorder = EMACallback(checkpoint_every_n_epochs=1), Recorder()
    logger = mlflow_logger(tracking)
    model = make_model()
    trainer = make_trainer(callbacks=[callback, recorder], logger=logger, log_every_n_steps=1)
    trainer.fit(model, *loaders)

    assert recorder.epoch_end_steps == [TRAIN_BATCHES, 2 * TRAIN_BATCHES] == [15, 30]
    models = logged_models(logger.run_id)
    # One raw and one EMA checkpoint per epoch; the one at the end of fit is the last epoch's.
    assert [
        (m.name, m.tags["mlflow_ema.kind"], m.tags["mlflow_ema.step"], m.tags["mlflow_ema.epoch"])
        for m in models
    ] == [
        ("ema-step15", "ema", "15", "1"),
        ("raw-step15", "raw", "15", "1"),
        ("ema-step30", "ema", "30", "2"),
        ("raw-step30", "raw", "30", "2"),
    ]
    assert all(str(m.status) == "READY" and m.source_run_id == logger.run_id for m in models)

    run = mlflow.get_run(logger.run_id)
    assert {"val_acc", "ema/val_acc", "train_loss"} <= set(run.data.metrics)
    client = mlflow.MlflowClient()
    # Each epoch: val_acc of the raw weights, ema/val_acc of the EMA ones; each checkpoint
    # carries the accuracy computed on its own weights.
    for kind, key in (("raw", "val_acc"), ("ema", "ema/val_acc")):
        history = client.get_metric_history(logger.run_id, key)
        assert [m.step for m in history] == [14, 29]  # Lightning's step: batches stepped - 1
        for model_, logged in zip(
            [m for m in models if m.tags["mlflow_ema.kind"] == kind], history, strict=True
        ):
            linked = {m.key: m.value for m in model_.metrics or []}
            assert linked[key] == logged.value
            assert not [k for k in linked if k.startswith("ema/") != (kind == "ema")], linked

    assert run.data.tags[RUN_TAG_MODEL_CLASS] == f"{DigitsNet.__module__}:DigitsNet"
    assert json.loads(run.data.tags[RUN_TAG_MODEL_HPARAMS]) == {
        "hidden": 32,
        "lr": 0.01,
        "fail_at_validation": None,
    }

    # The last checkpoints hold what the callback and the module hold at the end of fit.
    ema_state, ema_manifest = download(models[2], tmp_path)
    raw_state, raw_manifest = download(models[3], tmp_path)
    assert same(ema_state, callback.ema.model_state_dict())
    assert same(raw_state, model.state_dict())
    assert ema_manifest.step == raw_manifest.step == 30
    assert ema_manifest.ema_updates == callback.ema.num_updates == 30


# -- 2. validation: the raw weights, then the EMA ones; training keeps the raw ones ----------------


def test_validation_runs_raw_then_ema_and_fit_ends_with_raw_weights(tracking, loaders, tmp_path):
    callback, recorder = EMACallback(), Recorder()
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="ema/val_acc", mode="max", save_top_k=1)
    logger = mlflow_logger(tracking)
    model = make_model()
    trainer = make_trainer(
        callbacks=[recorder, best, callback], logger=logger, max_epochs=3, enable_checkpointing=True
    )
    trainer.fit(model, *loaders)

    # Two passes per epoch; the other callbacks see one validation (the raw one).
    assert len(model.validated_with) == 6 and recorder.validation_ends == 3
    raw_seen, ema_seen = model.validated_with[0::2], model.validated_with[1::2]
    for seen, ema in zip(ema_seen, recorder.ema_at_validation, strict=True):
        assert same(seen, ema)
    assert same(raw_seen[-1], recorder.raw) and not same(ema_seen[-1], recorder.raw)
    assert same(model.state_dict(), recorder.raw)  # the raw weights are back after fit
    assert not model.trained_in_eval_mode  # the second pass left train mode as it was

    # The logged accuracies, recomputed here by hand.
    client = mlflow.MlflowClient()
    raw_history = client.get_metric_history(logger.run_id, "val_acc")
    ema_history = client.get_metric_history(logger.run_id, "ema/val_acc")
    assert [m.value for m in raw_history] == pytest.approx(
        [accuracy(state, loaders[1]) for state in raw_seen], abs=1e-6
    )
    assert [m.value for m in ema_history] == pytest.approx(
        [accuracy(state, loaders[1]) for state in ema_seen], abs=1e-6
    )
    # Lightning's callback_metrics hold both, under MLflow's names; a monitor may watch either.
    assert trainer.callback_metrics["val_acc"].item() == pytest.approx(raw_history[-1].value, abs=1e-6)
    assert trainer.callback_metrics["ema/val_acc"].item() == pytest.approx(ema_history[-1].value, abs=1e-6)
    assert best.best_model_score.item() == pytest.approx(max(m.value for m in ema_history), abs=1e-6)
    # ModelCheckpoint saved the raw weights (never the EMA ones swapped in)
    saved = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(same(saved, ema) for ema in ema_seen)


def test_validate_raw_false_runs_the_ema_pass_only(tracking, loaders):
    callback, recorder = EMACallback(validate_raw=False, checkpoint_every_n_epochs=1), Recorder()
    logger = mlflow_logger(tracking)
    model = make_model()
    trainer = make_trainer(callbacks=[callback, recorder], logger=logger)
    trainer.fit(model, *loaders)

    assert len(model.validated_with) == len(recorder.ema_at_validation) == recorder.validation_ends == 2
    for seen, ema in zip(model.validated_with, recorder.ema_at_validation, strict=True):
        assert same(seen, ema)
    run = mlflow.get_run(logger.run_id)
    assert "ema/val_acc" in run.data.metrics
    assert not [key for key in run.data.metrics if key.startswith("val")], run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(logger.run_id, "ema/val_acc")
    assert [m.value for m in history] == pytest.approx(
        [accuracy(state, loaders[1]) for state in recorder.ema_at_validation], abs=1e-6
    )
    # Lightning's callback_metrics keep the plain name (the EMA's value); raw checkpoints rank by nothing
    assert trainer.callback_metrics["val_acc"].item() == pytest.approx(history[-1].value, abs=1e-6)
    for model_ in logged_models(logger.run_id):
        keys = {m.key for m in model_.metrics or []}
        assert ("ema/val_acc" in keys) == (model_.tags["mlflow_ema.kind"] == "ema")
        assert "val_acc" not in keys


# -- 3. one EMA update per optimizer step ----------------------------------------------------------


class ReferenceEMA(pl.Callback):
    """An EMA kept by hand from the optimizer's own step hook, independent of global_step."""

    def on_fit_start(self, trainer, pl_module):
        self.copy = DigitsNet(**pl_module.hparams)
        self.copy.load_state_dict(pl_module.state_dict())
        self.ema = EMA(self.copy, decay=WarmupDecay(decay=0.9999, power=3 / 4))

        def after_step(*_):
            self.copy.load_state_dict(pl_module.state_dict())
            self.ema.update()

        (optimizer,) = trainer.optimizers
        self.handle = optimizer.register_step_post_hook(after_step)

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_updates_once_per_optimizer_step(tracking, loaders, accumulate):
    callback, recorder, reference = EMACallback(checkpoint_at_end=False), Recorder(), ReferenceEMA()
    trainer = make_trainer(callbacks=[callback, recorder, reference], accumulate_grad_batches=accumulate)
    trainer.fit(make_model(), *loaders)

    steps_per_epoch = -(-TRAIN_BATCHES // accumulate)  # the last, short group steps too
    assert recorder.optimizer_steps == trainer.global_step == 2 * steps_per_epoch
    assert callback.ema.step == callback.ema.num_updates == reference.ema.step == trainer.global_step
    assert same(callback.ema.model_state_dict(), reference.ema.model_state_dict())


# -- 4. autolog adds the callback through Lightning's entry point ----------------------------------


class WatchedOwners(pl.Callback):
    """Who keeps an EMA in the session while training: one "lightning" entry, no "autolog" one."""

    def on_train_end(self, trainer, pl_module):
        self.owners = [w.driver for w in _SESSION.watched]


def test_autolog_adds_one_callback_and_stands_down_for_the_users_own(tracking, loaders):
    (entry_point,) = [
        ep
        for ep in importlib.metadata.entry_points(group="lightning.pytorch.callbacks_factory")
        if ep.name == "mlflow_ema"
    ]
    assert entry_point.value == "mlflow_ema.lightning:autolog_callbacks"

    mlflow_ema.autolog(checkpoint_every_n_epochs=1)
    logger, owners = mlflow_logger(tracking), WatchedOwners()
    trainer = make_trainer(logger=logger, callbacks=[owners])
    (auto,) = ema_callbacks(trainer)
    assert auto._auto and auto.checkpoint_every_n_epochs == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_model(), *loaders)
    assert not [w for w in caught if "mlflow-ema" in str(w.message)]  # e.g. "cannot tell which model"
    assert auto.ema.step == trainer.global_step == 30
    assert owners.owners == ["lightning"]  # autolog's optimizer hooks keep no second EMA
    assert kinds_and_steps(logger.run_id) == [("ema", 15), ("raw", 15), ("ema", 30), ("raw", 30)]
    assert _SESSION.watched == []

    # The user's own callback: autolog's copy is still added, but stays idle.
    mine = EMACallback()
    logger = mlflow_logger(tracking)
    trainer = make_trainer(callbacks=[mine, owners], logger=logger)
    assert len(ema_callbacks(trainer)) == 2
    trainer.fit(make_model(), *loaders)
    (auto,) = [cb for cb in ema_callbacks(trainer) if cb is not mine]
    assert mine.ema.step == trainer.global_step == 30
    assert auto.ema is None and owners.owners == ["lightning"]
    assert kinds_and_steps(logger.run_id) == [("ema", 30), ("raw", 30)]

    mlflow_ema.autolog(disable=True)
    assert ema_callbacks(make_trainer()) == []


def test_resume_crosses_between_autologs_callback_and_ones_own(tracking, loaders, tmp_path):
    """A Lightning checkpoint written with autolog's callback resumes with an explicit one."""
    mlflow_ema.autolog(checkpoint_at_end=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = make_trainer(max_epochs=1, callbacks=[checkpoints], enable_checkpointing=True)
    trainer.fit(make_model(), *loaders)
    (auto,) = ema_callbacks(trainer)
    mlflow_ema.autolog(disable=True)

    mine = EMACallback(checkpoint_at_end=False)
    trainer = make_trainer(callbacks=[mine])
    with pytest.warns(UserWarning, match="Please add the following callbacks"):  # Lightning's
        trainer.fit(make_model(seed=1), *loaders, ckpt_path=checkpoints.last_model_path)
    assert mine.ema.step == trainer.global_step == 30
    assert mine.ema.init_fingerprint == auto.ema.init_fingerprint


# -- 5. next to mlflow.pytorch.autolog ---------------------------------------------------------------


def test_alongside_mlflow_pytorch_autolog_without_a_logger(tracking, loaders):
    mlflow.pytorch.autolog(log_models=False)
    try:
        callback = EMACallback()
        model = make_model()
        trainer = pl.Trainer(
            max_epochs=2,
            callbacks=[callback],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(model, *loaders)
    finally:
        mlflow.pytorch.autolog(disable=True)

    run = mlflow.last_active_run()
    assert run is not None and run.info.status == "FINISHED"
    models = logged_models(run.info.run_id)
    assert [
        (m.tags["mlflow_ema.kind"], m.tags["mlflow_ema.step"], m.tags["mlflow_ema.epoch"]) for m in models
    ] == [
        ("ema", "30", "2"),
        ("raw", "30", "2"),
    ]
    assert all(str(m.status) == "READY" for m in models)
    # mlflow.pytorch.autolog logs callback_metrics after validation: the raw accuracy as
    # val_acc, the EMA's under the ema/ prefix.
    assert run.data.metrics["val_acc"] == pytest.approx(accuracy(model.state_dict(), loaders[1]), abs=1e-6)
    assert run.data.metrics["ema/val_acc"] == pytest.approx(
        accuracy(callback.ema.model_state_dict(), loaders[1]), abs=1e-6
    )
    assert run.data.tags[RUN_TAG_MODEL_CLASS] == f"{DigitsNet.__module__}:DigitsNet"


def test_mlflow_pytorch_autolog_val_metrics_link_to_the_ema_checkpoint(tracking, loaders):
    mlflow.pytorch.autolog(log_models=False)
    try:
        trainer = pl.Trainer(
            max_epochs=1,
            callbacks=[EMACallback()],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(make_model(), *loaders)
    finally:
        mlflow.pytorch.autolog(disable=True)
    run = mlflow.last_active_run()
    ema_model, raw_model = logged_models(run.info.run_id)
    # mlflow.pytorch.autolog logs callback_metrics at epoch end: val_acc and ema/val_acc, each
    # linked to the checkpoint of the weights it measured.
    assert {"val_acc", "ema/val_acc"} <= set(run.data.metrics)
    assert {m.key for m in raw_model.metrics or []} & {"val_acc", "ema/val_acc"} == {"val_acc"}
    assert {m.key for m in ema_model.metrics or []} & {"val_acc", "ema/val_acc"} == {"ema/val_acc"}


def test_mlflow_ema_autolog_without_a_logger_logs_the_modules_metrics_to_the_active_run(tracking, loaders):
    """No MLFlowLogger, no mlflow.pytorch.autolog: the callback logs what the module logs."""
    mlflow_ema.autolog(checkpoint_every_n_epochs=1)
    try:
        with mlflow.start_run() as run, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(logger=False).fit(make_model(), *loaders)
    finally:
        mlflow_ema.autolog(disable=True)
    assert not [w for w in caught if "mlflow-ema" in str(w.message)]
    client = mlflow.MlflowClient()
    for key in ("val_acc", "ema/val_acc", "train_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [15, 30], key
    assert not [k for k in mlflow.get_run(run.info.run_id).data.metrics if k.startswith("ema/train")]
    for model_ in logged_models(run.info.run_id):
        keys = {m.key for m in model_.metrics or []}
        expected = "ema/val_acc" if model_.tags["mlflow_ema.kind"] == "ema" else "val_acc"
        assert keys & {"val_acc", "ema/val_acc"} == {expected}, (model_.name, keys)


# -- 6. resume through Lightning's own checkpoint ----------------------------------------------------


def test_resume_from_lightning_checkpoint_continues_the_ema_bit_for_bit(tracking, loaders, tmp_path):
    straight = EMACallback(checkpoint_at_end=False)
    trainer = make_trainer(max_epochs=3, callbacks=[straight])
    trainer.fit(make_model(), *loaders)
    expected_model = clone(trainer.lightning_module.state_dict())

    # Two epochs, checkpointed by Lightning; then a new Trainer and module carry on to three.
    logger = mlflow_logger(tracking)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = EMACallback()
    trainer = make_trainer(callbacks=[first, checkpoints], enable_checkpointing=True, logger=logger)
    trainer.fit(make_model(), *loaders)
    assert Path(checkpoints.last_model_path).name == "last.ckpt"
    assert first.ema.step == 30

    resumed = EMACallback()
    logger = mlflow_logger(tracking, run_id=logger.run_id)
    trainer = make_trainer(max_epochs=3, callbacks=[resumed], logger=logger)
    trainer.fit(make_model(seed=1), *loaders, ckpt_path=checkpoints.last_model_path)

    assert resumed.ema.step == resumed.ema.num_updates == trainer.global_step == 45
    assert same(trainer.lightning_module.state_dict(), expected_model)
    assert same(resumed.ema.model_state_dict(), straight.ema.model_state_dict())
    assert resumed.ema.init_fingerprint == straight.ema.init_fingerprint
    # The run goes on with the resumed checkpoints.
    assert [
        (m.tags["mlflow_ema.kind"], m.tags["mlflow_ema.step"], m.tags["mlflow_ema.epoch"])
        for m in logged_models(logger.run_id)
    ] == [("ema", "30", "2"), ("raw", "30", "2"), ("ema", "45", "3"), ("raw", "45", "3")]


# -- 7. failures -------------------------------------------------------------------------------------


def test_an_exception_in_validation_leaves_the_raw_weights(tracking, loaders):
    callback, recorder = EMACallback(checkpoint_every_n_epochs=1), Recorder()
    logger = mlflow_logger(tracking)
    model = make_model(fail_at_validation=4)  # epoch 2's EMA pass
    trainer = make_trainer(callbacks=[callback, recorder], logger=logger)
    with pytest.raises(RuntimeError, match="validation failed on purpose"):
        trainer.fit(model, *loaders)

    assert same(model.validated_with[-1], recorder.ema_at_validation[-1])  # it failed with EMA weights
    assert same(model.state_dict(), recorder.raw)  # and they are gone
    assert not same(model.state_dict(), callback.ema.model_state_dict())
    assert not _SESSION.routing.prefixing  # metrics are no longer renamed ema/
    assert recorder in trainer.callbacks and not callback._in_ema_pass
    assert _SESSION.watched == []
    callback.ema.update()  # not stuck in a swap

    run = mlflow.get_run(logger.run_id)
    assert run.info.status == "FAILED"
    assert kinds_and_steps(logger.run_id) == [("ema", 15), ("raw", 15)]  # epoch 1's, uploaded


def test_a_callback_reused_by_a_new_trainer(tracking, loaders):
    callback = EMACallback(checkpoint_at_end=False)
    model = make_model()
    make_trainer(max_epochs=1, callbacks=[callback]).fit(model, *loaders)
    # The same module again: its EMA goes on, although the new Trainer counts steps from 0.
    make_trainer(max_epochs=1, callbacks=[callback]).fit(model, *loaders)
    assert callback.ema.step == 2 * TRAIN_BATCHES
    # Another module: a fresh EMA of it.
    other = make_model(seed=1)
    fresh = EMA(other, decay=0.5)
    make_trainer(max_epochs=1, callbacks=[callback]).fit(other, *loaders)
    assert callback.ema.step == TRAIN_BATCHES
    assert callback.ema.init_fingerprint == fresh.init_fingerprint
    with callback.ema.swap() as swapped:
        assert swapped is other


# -- 8. the README's Lightning section runs as written ------------------------------------------------


def readme_lightning_snippets() -> str:
    """The Python blocks of README.md's "### Lightning" section, in order."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n### Lightning\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 2, "the section's snippets changed: update this test"
    return "\n".join(blocks)


def test_the_readmes_lightning_snippets_run_as_written(tracking):
    """Verbatim, in a fresh folder with MLflow's default sqlite store: one run through the
    MLFlowLogger, one through mlflow_ema.autolog() with logger=False."""
    try:
        exec(compile(readme_lightning_snippets(), "README.md", "exec"), {"__name__": "readme_lightning"})
    finally:
        mlflow_ema.autolog(disable=True)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 2
    client = mlflow.MlflowClient()
    for run in runs:
        for key in ("val_acc", "ema/val_acc"):
            assert len(client.get_metric_history(run.info.run_id, key)) == 2, (run.info.run_name, key)
        models = logged_models(run.info.run_id)
        assert [m.tags["mlflow_ema.kind"] for m in models] == ["ema", "raw", "ema", "raw"]
        for model_ in models:
            expected = "ema/val_acc" if model_.tags["mlflow_ema.kind"] == "ema" else "val_acc"
            assert expected in {m.key for m in model_.metrics or []}, model_.name


def test_posthoc_emas_snapshot_in_fit_and_resume_from_lightning_checkpoints(tracking, loaders, tmp_path):
    """Issue 14: EMACallback(posthoc_every_n_steps=...) logs snapshots every N steps and at
    the end of fit, and Lightning's .ckpt carries the post-hoc EMAs bit for bit."""
    straight = EMACallback(checkpoint_at_end=False, posthoc_every_n_steps=10)
    make_trainer(max_epochs=3, callbacks=[straight]).fit(make_model(), *loaders)

    logger = mlflow_logger(tracking)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = EMACallback(posthoc_every_n_steps=10, posthoc_sigma_rels=(0.05, 0.1))
    trainer = make_trainer(callbacks=[first, checkpoints], enable_checkpointing=True, logger=logger)
    trainer.fit(make_model(), *loaders)  # 30 steps
    resumed = EMACallback(posthoc_every_n_steps=10)
    trainer = make_trainer(
        max_epochs=3, callbacks=[resumed], logger=mlflow_logger(tracking, run_id=logger.run_id)
    )
    trainer.fit(make_model(seed=1), *loaders, ckpt_path=checkpoints.last_model_path)  # to 45

    for (sigma, ema), (_, reference) in zip(resumed.posthoc, straight.posthoc, strict=True):
        assert ema.step == 45 and same(ema.model_state_dict(), reference.model_state_dict()), sigma
    names = sorted(m.name for m in logged_models(logger.run_id) if m.tags["mlflow_ema.kind"] == "posthoc")
    assert names == sorted(f"posthoc{s}-step{n}" for s in ("0_05", "0_1") for n in (10, 20, 30, 40, 45))
