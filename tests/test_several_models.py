"""Several models in one run under plain ``autolog()`` (issue 13, item 3): a GAN with two
optimizers gets both models checkpointed, each under its own name; two models of one class
get distinct names; one module holding several optimizers' parameters is warned about."""

from __future__ import annotations

import json
import warnings

import mlflow
import pytest
import torch
from helpers import logged_models
from mlflow import MlflowClient
from torch import nn

import mlflow_ema


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 64), nn.Sigmoid())

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


def train_gan(G, D, opt_g, opt_d, digits, steps: int, start: int = 0) -> None:
    """The textbook loop: a discriminator step, then a generator step."""
    x, _ = digits
    bce = nn.BCEWithLogitsLoss()
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        real, z = x[torch.randint(0, len(x), (32,), generator=g)], torch.randn(32, 16, generator=g)
        fake = G(z)
        d_loss = bce(D(real), torch.ones(32, 1)) + bce(D(fake.detach()), torch.zeros(32, 1))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = bce(D(fake), torch.ones(32, 1))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()


def test_a_gan_gets_both_models_checkpointed_under_their_names(tracking, digits):
    torch.manual_seed(0)
    G, D = Generator(), Discriminator()
    opt_g, opt_d = torch.optim.Adam(G.parameters(), 2e-4), torch.optim.Adam(D.parameters(), 2e-4)
    mlflow_ema.autolog(checkpoint_every_n_steps=5)
    with warnings.catch_warnings(record=True) as caught, mlflow.start_run() as run:
        warnings.simplefilter("always")
        train_gan(G, D, opt_g, opt_d, digits, 10)
        steps = mlflow_ema.get_ema(G).step, mlflow_ema.get_ema(D).step  # each its own optimizer's
    assert steps == (10, 10)
    assert not [w for w in caught if "mlflow-ema" in str(w.message)]
    models = logged_models(run.info.run_id)
    assert sorted(m.name for m in models) == sorted(
        f"{who}-{kind}-step{s}"
        for who in ("generator", "discriminator")
        for kind in ("raw", "ema")
        for s in (5, 10)
    )
    for m in models:
        who = m.name.split("-")[0]
        assert m.tags["mlflow_ema.model_name"] == who
        weights = mlflow_ema.load_state_dict(f"models:/{m.model_id}")
        own = (G if who == "generator" else D).state_dict()
        assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in own.items()}
    folders = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "mlflow_ema")}
    assert folders == {"mlflow_ema/generator-architecture", "mlflow_ema/discriminator-architecture"}
    generator = mlflow_ema.load_model(
        f"models:/{next(m.model_id for m in models if m.name == 'generator-ema-step10')}"
    )
    assert generator(torch.randn(3, 16)).shape == (3, 64)


def test_two_models_of_one_class_get_distinct_names_in_step_order(tracking, digits):
    x, y = digits
    first, second = nn.Sequential(nn.Linear(64, 10)), nn.Sequential(nn.Linear(64, 10))
    opt_1, opt_2 = torch.optim.SGD(first.parameters(), 0.1), torch.optim.SGD(second.parameters(), 0.1)
    mlflow_ema.autolog()
    with mlflow.start_run() as run:
        for _ in range(3):
            for model, opt in ((second, opt_2), (first, opt_1)):  # the second model steps first
                loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
                opt.zero_grad()
                loss.backward()
                opt.step()
    names = {m.name: m.tags["mlflow_ema.model_name"] for m in logged_models(run.info.run_id)}
    assert names == {
        "sequential-raw-step3": "sequential", "sequential-ema-step3": "sequential",
        "sequential-2-raw-step3": "sequential-2", "sequential-2-ema-step3": "sequential-2",
    }  # fmt: skip
    by_name = {m.name: m for m in logged_models(run.info.run_id)}
    stepped_first = mlflow_ema.load_state_dict(f"models:/{by_name['sequential-raw-step3'].model_id}")
    assert torch.equal(stepped_first["0.weight"], second[0].weight)  # named in the order they first stepped


def test_one_model_keeps_todays_names_and_is_tagged(tracking, digits):
    x, y = digits
    model = nn.Sequential(nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), 0.1)
    mlflow_ema.autolog()
    with mlflow.start_run() as run:
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    models = logged_models(run.info.run_id)
    assert sorted(m.name for m in models) == ["ema-step1", "raw-step1"]
    assert {m.tags["mlflow_ema.model_name"] for m in models} == {"sequential"}


class GAN(nn.Module):
    """Both models in one module: one EMA would cover both, stepped by one optimizer."""

    def __init__(self):
        super().__init__()
        self.generator, self.discriminator = Generator(), Discriminator()


def test_one_module_holding_several_optimizers_parameters_is_warned_about(tracking, digits):
    gan = GAN()
    opt_g = torch.optim.Adam(gan.generator.parameters(), 2e-4)
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), 2e-4)
    G, D = gan.generator, gan.discriminator  # noqa: F841 - held, as a user's loop would
    mlflow_ema.autolog(checkpoint_at_end=False)
    warning = r"one module, GAN, holds the parameters of several optimizers \(Adam, Adam\)"
    with pytest.warns(UserWarning, match=warning), mlflow.start_run():
        train_gan(gan.generator, gan.discriminator, opt_g, opt_d, digits, 2)


class Trainer:
    """A user's trainer class: the models only in a dict attribute, the loop in a method."""

    def __init__(self, digits):
        torch.manual_seed(0)
        self.models = {"G": Generator(), "D": Discriminator()}
        self.optimizers = {k: torch.optim.Adam(m.parameters(), 2e-4) for k, m in self.models.items()}
        self.digits = digits

    def fit(self, steps: int) -> None:
        train_gan(
            self.models["G"], self.models["D"], self.optimizers["G"], self.optimizers["D"], self.digits, steps
        )


def test_models_held_only_by_a_trainer_object_are_found(tracking, digits):
    trainer = Trainer(digits)
    mlflow_ema.autolog()
    with mlflow.start_run() as run:
        trainer.fit(3)
    names = sorted(m.name for m in logged_models(run.info.run_id))
    assert names == sorted(f"{w}-{k}-step3" for w in ("generator", "discriminator") for k in ("raw", "ema"))


_HIDDEN = {}


def _step_hidden() -> None:
    """The model lives in a module-level dict nothing on the stack holds."""
    _HIDDEN["model"](torch.randn(4, 64)).sum().backward()
    _HIDDEN["opt"].step()


def test_a_model_the_stack_does_not_hold_is_not_guessed_and_watch_is_suggested(tracking):
    _HIDDEN["model"] = nn.Linear(64, 10)
    _HIDDEN["opt"] = torch.optim.SGD(_HIDDEN["model"].parameters(), 0.1)
    mlflow_ema.autolog()
    try:
        with (
            pytest.warns(
                UserWarning,
                match=r"cannot tell which model SGD trains.*mlflow_ema\.watch\(model, optimizer\)",
            ),
            mlflow.start_run(),
        ):
            _step_hidden()
    finally:
        _HIDDEN.clear()


def test_the_averaged_generator_of_a_gan_sweep_is_registered(tracking, digits):
    from helpers import run_cli

    mlflow.set_experiment("gan")
    torch.manual_seed(0)
    init_g, init_d = Generator().state_dict(), Discriminator().state_dict()  # one base for the sweep
    mlflow_ema.autolog()
    for lr in (1e-3, 2e-3):
        G, D = Generator(), Discriminator()
        G.load_state_dict(init_g)
        D.load_state_dict(init_d)
        opt_g, opt_d = torch.optim.Adam(G.parameters(), lr), torch.optim.Adam(D.parameters(), lr)
        with mlflow.start_run():
            train_gan(G, D, opt_g, opt_d, digits, 4)
            mlflow.log_metric("ema/score", lr)
    average = (
        "average",
        "-e",
        "gan",
        "--metric",
        "ema/score",
        "--top-k",
        "2",
        "--register-as",
        "generator-soup",
    )
    line = [x for x in run_cli(*average, code=1).splitlines() if x.strip()]
    assert (
        len(line) == 1
        and "trains several models (discriminator, generator): choose one with --model NAME" in line[0]
    )
    listed = run_cli("ls", "-e", "gan", "--metric", "ema/score", "--model", "generator")
    assert listed.count("generator-ema-step4") == 2
    out = json.loads(run_cli(*average, "--model", "generator", "--json"))
    assert [m["name"] for m in out["members"]] == ["generator-ema-step4"] * 2
    generator = mlflow.pytorch.load_model("models:/generator-soup/1")
    soup = mlflow_ema.load_state_dict("models:/generator-soup/1")
    z = torch.randn(5, 16)
    reference = Generator()
    reference.load_state_dict(soup)
    torch.testing.assert_close(generator(z), reference(z))


def test_a_gan_resumes_bit_for_bit_each_model_from_its_own_checkpoint(tracking, digits):
    from mlflow_ema.tracking import _SESSION

    def fresh():
        torch.manual_seed(0)
        G, D = Generator(), Discriminator()
        return G, D, torch.optim.Adam(G.parameters(), 2e-4), torch.optim.Adam(D.parameters(), 2e-4)

    mlflow_ema.autolog(checkpoint_every_n_steps=3, log_training_state=True, checkpoint_at_end=False)
    G, D, opt_g, opt_d = fresh()
    with mlflow.start_run():
        train_gan(G, D, opt_g, opt_d, digits, 6)
        expected = {"G": (G.state_dict(), mlflow_ema.get_ema(G).model_state_dict()),
                    "D": (D.state_dict(), mlflow_ema.get_ema(D).model_state_dict())}  # fmt: skip
    _SESSION.reset()
    mlflow_ema.autolog(checkpoint_every_n_steps=3, log_training_state=True, checkpoint_at_end=False)
    G, D, opt_g, opt_d = fresh()
    with mlflow.start_run() as killed:
        train_gan(G, D, opt_g, opt_d, digits, 4)  # checkpoints at step 3, then the job dies
        mlflow_ema.flush()
    _SESSION.reset()  # a new process
    mlflow_ema.autolog(checkpoint_every_n_steps=3, log_training_state=True, checkpoint_at_end=False)
    G, D, opt_g, opt_d = fresh()
    with mlflow.start_run(run_id=killed.info.run_id):
        assert mlflow_ema.resume(G, opt_g).step == mlflow_ema.resume(D, opt_d).step == 3
        train_gan(G, D, opt_g, opt_d, digits, 3, start=3)
        got = {"G": (G.state_dict(), mlflow_ema.get_ema(G).model_state_dict()),
               "D": (D.state_dict(), mlflow_ema.get_ema(D).model_state_dict())}  # fmt: skip
    for who in ("G", "D"):
        for mine, theirs in zip(got[who], expected[who], strict=True):
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs), who
