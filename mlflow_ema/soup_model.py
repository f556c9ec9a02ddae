"""The module a soup's weights go into, and how its registered version is written.

By default nothing of the user's code is needed: the run's architecture folder (recorded
in training, :mod:`mlflow_ema.capture`) gives an exported program, whose weights are
replaced by the soup's, and the version is written in MLflow's pt2 format, with a
signature and an input example. A factory (``--model-factory``, or one the run recorded
and the user trusts) builds the user's own module instead; it is needed for
``--update-bn`` (which trains BatchNorm statistics: a program cannot) and for
``--serialization pickle``.

Runs written before mlflow-ema 0.4 recorded no inputs: a factory's module is then
registered as a pickle (``--serialization`` not given), with a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlflow_ema.architecture import build_model
from mlflow_ema.average_options import AverageOptions
from mlflow_ema.errors import MlflowEmaError
from mlflow_ema.inputs import InputSpec, synthetic_leaves, with_tensors
from mlflow_ema.programs import (
    EXAMPLE_FILE,
    INPUTS_FILE,
    PROGRAM_FILE,
    ExportedModule,
    architecture_path,
    checkpoint_model_name,
    flat_inputs,
    load_program,
)
from mlflow_ema.selection import Candidate
from mlflow_ema.tags import RUN_TAG_ARCHITECTURE_ERROR
from mlflow_ema.trust import trusted_prefixes


@dataclasses.dataclass
class SoupModel:
    """``module`` receives the weights (an :class:`ExportedModule` or the user's module);
    ``inputs`` and ``example`` (a real sample's tensors, if recorded) make the registered
    version's input example; ``serialization`` is ``"pt2"`` or ``"pickle"``."""

    module: nn.Module
    inputs: InputSpec | None
    example: list[torch.Tensor] | None
    serialization: str

    def example_arrays(self) -> list[Any]:
        """The input example's tensors as numpy arrays (batch 2 where it is dynamic)."""
        assert self.inputs is not None
        leaves = (
            with_tensors(self.inputs, self.example)
            if self.example
            else synthetic_leaves(self.inputs, batch=2)
        )
        return [leaf.numpy() for leaf in leaves if isinstance(leaf, torch.Tensor)]


def model_name(candidate: Candidate) -> str | None:
    """The name a checkpoint's model has among its run's models (``G-ema-step9`` -> ``G``)."""
    return checkpoint_model_name(candidate.name, candidate.kind)


def soup_model(options: AverageOptions, first: Candidate, folder: Path) -> SoupModel:
    """The module for the soup of ``first``'s sweep (see the module docstring);
    the architecture folder is downloaded into ``folder``."""
    import mlflow

    tags = mlflow.MlflowClient().get_run(first.run_id).data.tags
    recorded = download_architecture(first.run_id, model_name(first), folder)
    inputs, example = _read_inputs(recorded, first.run_id) if recorded else (None, None)
    program = recorded / PROGRAM_FILE if recorded and (recorded / PROGRAM_FILE).exists() else None
    needs_module = options.serialization == "pickle" or options.update_bn or options.model_factory
    if program is not None and not needs_module:
        return SoupModel(load_program(program), inputs, example, "pt2")
    if options.update_bn and not options.model_factory and program is not None:
        _need_factory(tags, first, options, "--update-bn recomputes BatchNorm statistics, which an exported program "
                      "cannot (it runs in eval mode)")  # fmt: skip
    why = tags.get(RUN_TAG_ARCHITECTURE_ERROR) or "it was trained with mlflow-ema < 0.4"
    if program is None and not options.model_factory:
        _need_factory(tags, first, options, f"run {first.run_id} recorded no architecture program ({why})")
    module = build_model(tags, run_id=first.run_id, model_factory=options.model_factory,
                         model_kwargs=options.model_kwargs, trusted=trusted_prefixes(options.trust_modules))  # fmt: skip
    return SoupModel(module, inputs, example, _serialization(options, inputs, program, why))


def _need_factory(tags: Any, first: Candidate, options: AverageOptions, why: str) -> None:
    """Fail unless a factory is at hand: given, or recorded and trusted."""
    from mlflow_ema.architecture import check_rebuildable

    try:
        check_rebuildable(tags, run_id=first.run_id, model_factory=options.model_factory,
                          trusted=trusted_prefixes(options.trust_modules))  # fmt: skip
    except MlflowEmaError as e:
        raise MlflowEmaError(f"{why}: give --model-factory MODULE:FUNCTION ({e})") from None


def _serialization(options: AverageOptions, inputs: InputSpec | None, program: Path | None, why: str) -> str:
    if options.serialization:
        if options.serialization == "pt2" and inputs is None:
            raise MlflowEmaError(
                f"--serialization pt2 needs the model's inputs, which the run did not record ({why})"
            )
        return options.serialization
    if inputs is not None and program is not None:
        return "pt2"
    if options.register_as:
        warnings.warn(
            f"mlflow-ema: the model cannot be registered in the pt2 format ({why}); registering it as a "
            "pickle, which loads only where your model's code is importable, and runs code from the file",
            stacklevel=2,
        )
    return "pickle"


def download_architecture(run_id: str, name: str | None, folder: Path) -> Path | None:
    """The run's architecture folder of the model ``name``, downloaded; None if there is none."""
    import mlflow

    path = architecture_path(name)
    listed = {a.path.rsplit("/", 1)[-1] for a in mlflow.MlflowClient().list_artifacts(run_id, path)}
    if INPUTS_FILE not in listed:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(folder)))


_MAX_INPUTS_JSON = 1 << 20  # bytes: a spec of a few leaves is a few hundred


def _read_inputs(folder: Path, run_id: str) -> tuple[InputSpec, list[torch.Tensor] | None]:
    """The recorded inputs and real example (if any), refused in one line when malformed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / INPUTS_FILE
    try:
        if path.stat().st_size > _MAX_INPUTS_JSON:
            raise ValueError(f"larger than {_MAX_INPUTS_JSON} bytes")
        inputs = InputSpec.from_json(path.read_text())
        if not (folder / EXAMPLE_FILE).exists():
            return inputs, None
        tensors = load_file(str(folder / EXAMPLE_FILE))
        example = [tensors[f"input_{i}"] for i in range(len(inputs.tensor_leaves))]
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as e:
        raise MlflowEmaError(
            f"run {run_id}: its recorded architecture is unreadable ({path.name}: {e})"
        ) from None
    return inputs, example


def log_soup_model(soup: SoupModel, pip_requirements: list[str]) -> Any:
    """``mlflow.pytorch.log_model`` of the module holding the soup's weights, in the active
    run: pt2 (the program re-exported, no pickle; a signature and an input example), or
    pickle on request. A forward of several inputs is registered taking them as
    positional tensors in order, with no input example (MLflow stores one only for one)."""
    import mlflow

    module = soup.module.eval()
    if soup.serialization == "pickle":
        return mlflow.pytorch.log_model(module, name="model", serialization_format="pickle",
                                        pip_requirements=pip_requirements)  # fmt: skip
    if isinstance(module, ExportedModule):
        module = module.program
    arrays = soup.example_arrays()
    assert soup.inputs is not None
    if soup.inputs.single_tensor:
        return mlflow.pytorch.log_model(module, name="model", input_example=arrays[0], serialization_format="pt2",
                                        pip_requirements=pip_requirements)  # fmt: skip
    return mlflow.pytorch.log_model(flat_inputs(module, soup.inputs), name="model", input_example=tuple(arrays),
                                    signature=_signature(arrays), serialization_format="pt2",
                                    pip_requirements=pip_requirements)  # fmt: skip


def _signature(arrays: list[Any]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    specs = [
        TensorSpec(a.dtype, (-1, *a.shape[1:]) if a.ndim else (), f"input_{i}") for i, a in enumerate(arrays)
    ]
    return ModelSignature(inputs=Schema(specs))
