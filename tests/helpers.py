"""Helpers for the tests: a small network to train on scikit-learn's digits, and MLflow look-ups."""

from __future__ import annotations

import torch
from torch import nn


def make_net(seed: int = 0, hidden: int = 32) -> nn.Module:
    """An MLP with BatchNorm, so it has float and integer buffers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_steps(model, optimizer, digits, steps: int, *, start: int = 0, after_step=None, batch: int = 64):
    """Real optimizer steps on digits; ``after_step()`` runs after each. Step ``i`` always
    draws the same batch, so a run split at ``start`` sees the batches an unsplit one does."""
    x, y = digits
    model.train()
    for i in range(start, start + steps):
        idx = torch.randint(0, len(x), (batch,), generator=torch.Generator().manual_seed(i))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()


class Tied(nn.Module):
    """A language-model-like toy whose output layer shares the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight


def logged_models(run_id: str) -> list:
    """The run's checkpoint LoggedModels, by step then kind (ema before raw)."""
    import mlflow

    run = mlflow.get_run(run_id)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )
    return sorted(models, key=lambda m: (int(m.tags["mlflow_ema.step"]), m.tags["mlflow_ema.kind"]))


def digits_accuracy(model) -> float:
    """An --eval function for the CLI tests: accuracy on scikit-learn's digits."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    return (model(x).argmax(1) == torch.tensor(y)).float().mean().item()


def digits_loader():
    """An --update-bn function for the CLI tests: a loader over scikit-learn's digits."""
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    return torch.utils.data.DataLoader(torch.tensor(x / 16.0, dtype=torch.float32), batch_size=256)


def make_mlp(seed: int = 0, hidden: int = 32) -> nn.Module:
    """An MLP without BatchNorm: its training on split batches equals one process's."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def digits_batches(steps: int, batch: int = 64, seed: int = 1000):
    """``steps`` global batches of scikit-learn's digits, the same on every call and rank."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    for i in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=torch.Generator().manual_seed(seed + i))
        yield x[idx], y[idx]


def run_cli(*args: str, code: int = 0) -> str:
    """The real click app in-process, which must exit with ``code``; stdout for a successful
    ``--json``, else everything it printed."""
    from click.testing import CliRunner
    from mlflow_ema.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.stdout if code == 0 and "--json" in args else result.output
