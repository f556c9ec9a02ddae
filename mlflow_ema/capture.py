"""Recording a watched model's architecture during training, so that its soups can be
registered later without the user's code (:mod:`mlflow_ema.programs` says what is stored).

1. When a model is watched, a forward pre-hook waits for its next forward call and
   records what it takes (shapes, dtypes, structure: :mod:`mlflow_ema.inputs`), then
   removes itself. Nothing else runs per step.
2. At the model's first checkpoint (between steps, on rank 0) the model is exported
   once with ``torch.export`` on synthetic inputs of those shapes, in eval mode, and
   written to a local architecture folder: about the time of one ``torch.export`` (1-2 s
   for a small CNN on CPU), once per model.
3. The upload thread uploads that folder to each run the model is checkpointed in.

An export that fails (data-dependent control flow, inputs that are not tensors, a
sharded model) warns once, naming the model class and the fix (``model_factory=``), and
the run tag ``mlflow_ema.architecture_error`` records why.
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow_ema.inputs import InputSpec, UnsupportedInputs, describe_inputs, real_sample
from mlflow_ema.programs import EXAMPLE_FILE, INPUTS_FILE, PROGRAM_FILE, export_model, save_program
from mlflow_ema.safety import BOUNDARY, CAPTURE
from mlflow_ema.tags import RUN_TAG_MODEL_FACTORY, RUN_TAG_MODEL_HPARAMS

if TYPE_CHECKING:
    from mlflow_ema.session import Session
    from mlflow_ema.watched import Watched


@dataclasses.dataclass(eq=False)
class Architecture:
    """What is known of a watched model's architecture. ``folder`` is written once, at its
    first checkpoint after a forward was seen; ``error`` says why it holds no program."""

    inputs: InputSpec | None = None
    sample: list[Any] | None = None  # a real input's first rows (log_input_examples=True)
    folder: Path | None = None
    error: str | None = None
    export_seconds: float | None = None
    hook: Any = None  # the forward pre-hook's handle, until a forward is seen


def start_capture(w: Watched, session: Session) -> None:
    """Wait for ``w``'s next forward call, behind the safety boundary."""
    if w.sharded:
        w.architecture.error = "a sharded model (DTensor parameters) cannot be exported"
        return
    real = session.config.log_input_examples

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        BOUNDARY.call(CAPTURE, _record, w, args, kwargs, real)

    # On the wrapper the loop calls, if any: a compiled model's own hooks run inside the graph.
    target = w.entry if w.entry is not None else w.model
    w.architecture.hook = target.register_forward_pre_hook(_eager(hook), with_kwargs=True)


def stop_capture(w: Watched) -> None:
    if w.architecture.hook is not None:
        w.architecture.hook.remove()
        w.architecture.hook = None


def _eager(fn: Any) -> Any:
    """Run the hook in Python even inside a compiled forward (``model.compile()``: a graph
    break, once). Only when dynamo is loaded already: importing it costs about a second."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo.disable(fn) if dynamo is not None and hasattr(dynamo, "disable") else fn


def _record(w: Watched, args: tuple, kwargs: dict, real: bool) -> None:
    stop_capture(w)
    model_class = f"{type(w.model).__module__}:{type(w.model).__qualname__}"
    try:
        w.architecture.inputs = describe_inputs(args, kwargs, model_class=model_class)
    except UnsupportedInputs as e:
        w.architecture.error = str(e)
        return
    if real:
        w.architecture.sample = real_sample(args, kwargs)


def architecture_folder(w: Watched, session: Session, *, run_end: bool = False) -> Path | None:
    """``w``'s architecture folder, exporting the model the first time (rank 0, between
    steps); None while no forward was seen, or when there is nothing to upload."""
    arch = w.architecture
    if arch.folder is not None or arch.error is not None:
        if arch.error is not None:
            _warn_unrebuildable(w, session)
        return arch.folder
    if arch.inputs is None:
        if run_end:
            arch.error = "no forward call of the model was seen after mlflow-ema found it"
            _warn_unrebuildable(w, session)
        return None
    return BOUNDARY.call(CAPTURE, _export, w, session)


def _export(w: Watched, session: Session) -> Path:
    arch = w.architecture
    folder = Path(tempfile.mkdtemp(prefix="mlflow-ema-architecture-"))
    atexit.register(shutil.rmtree, folder, True)
    started = time.perf_counter()
    try:
        program = export_model(w.model, arch.inputs)
        save_program(program, folder / PROGRAM_FILE, weights=False)
    except Exception as e:  # the user's model: data-dependent control flow and the like
        (folder / PROGRAM_FILE).unlink(missing_ok=True)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        arch.error = f"torch.export failed: {type(e).__name__}: {first}"
        _warn_unrebuildable(w, session)
    arch.export_seconds = time.perf_counter() - started
    if arch.sample is not None:
        from safetensors.torch import save_file

        save_file(
            {f"input_{i}": t.contiguous() for i, t in enumerate(arch.sample)}, str(folder / EXAMPLE_FILE)
        )
        arch.inputs.real_example = True
    (folder / INPUTS_FILE).write_text(arch.inputs.to_json())
    arch.folder = folder
    return folder


def _warn_unrebuildable(w: Watched, session: Session) -> None:
    """Item 5 of the contract: say at training time that soups will need the user's code."""
    if RUN_TAG_MODEL_FACTORY in w.run_tags or RUN_TAG_MODEL_HPARAMS in w.run_tags:
        return  # the run records a factory (or a LightningModule's class): soups are rebuilt with it
    cls = type(w.model)
    session.warn_once(
        f"architecture-{id(w)}",
        f"the architecture of {cls.__qualname__} (module {cls.__module__}) is not recorded "
        f"({w.architecture.error}): its soups cannot be registered without your code. Pass "
        "model_factory='package.module:function' to mlflow_ema.autolog() or watch() (a module "
        "importable where you average), or --model-factory to mlflow-ema average",
    )
