"""A model's architecture as a ``torch.export`` program: exported in training, read back
without pickle, run as a module.

An **architecture folder** (the run artifact ``mlflow_ema/architecture/``, or
``mlflow_ema/<name>-architecture/`` for a model watched with ``name=``) holds:

- ``inputs.json``: what the forward takes (:class:`mlflow_ema.inputs.InputSpec`);
- ``program.pt2``: ``torch.export.save`` of the model in eval mode, on CPU, its batch
  dimension dynamic, its parameters and buffers placeholders (a zero each: the
  checkpoints hold the weights); absent when the export failed (the run tag
  ``mlflow_ema.architecture_error`` says why);
- ``input_example.safetensors``: the first rows of a real input, only with
  ``autolog(log_input_examples=True)``.

A checkpoint's or a soup's weights go into it (:func:`load_program`, then
``load_state_dict``) before it is used.
``torch.export.load`` unpickles some records of an archive, so :func:`check_pickle_free`
runs first, every time: an archive from a tracking server is data, never code.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from mlflow_ema.errors import CheckpointError
from mlflow_ema.inputs import InputSpec, synthetic_leaves, unflatten

PROGRAM_FILE = "program.pt2"
INPUTS_FILE = "inputs.json"
EXAMPLE_FILE = "input_example.safetensors"


def architecture_path(name: str | None) -> str:
    """The run artifact path of a model's architecture folder."""
    return f"mlflow_ema/{name}-architecture" if name else "mlflow_ema/architecture"


def checkpoint_model_name(checkpoint: str, kind: str) -> str | None:
    """The model name a checkpoint's name starts with (``generator-ema-step9`` -> ``generator``),
    None for a run's only model (``ema-step9``)."""
    cut = checkpoint.rfind("posthoc" if kind == "posthoc" else f"{kind}-step")  # posthoc<sigma_rel>-step
    return checkpoint[:cut].removesuffix("-") or None if cut > 0 else None


# -- exporting ------------------------------------------------------------------------------------


def export_model(model: nn.Module, spec: InputSpec) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` in eval mode on synthetic inputs of ``spec``, the batch
    dimension of each tensor dynamic where the model allows it (``Dim.AUTO``), on CPU.
    The model's train/eval flags and the random state are as before; ``spec`` learns
    which batch dimensions stayed dynamic."""
    args, kwargs = unflatten(spec, synthetic_leaves(spec))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), (args, kwargs))
    modes = {m: m.training for m in model.modules()}
    rng = torch.get_rng_state()
    try:
        model.eval()
        with _quiet_torch():
            program = torch.export.export(
                model, args, kwargs, dynamic_shapes=_batch_dims(model, args, kwargs)
            )
    finally:
        for module, training in modes.items():
            module.training = training
        torch.set_rng_state(rng)
    if device.type != "cpu" or any(t.device.type != "cpu" for t in program.state_dict.values()):
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, "cpu")
    _learn_dynamic(program, spec)
    return program


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """No graph dumps nor torch log lines in the user's output when an export fails: our
    one warning says what matters. (Python's stderr is redirected for the export's second
    or two, while the training thread waits for it.)"""
    loggers = [
        logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.split(".")[0] == "torch"
    ]
    disabled = [(logger, logger.disabled) for logger in loggers]
    for logger, _ in disabled:
        logger.disabled = True
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, was in disabled:
            logger.disabled = was


def _batch_dims(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``dynamic_shapes`` by argument name: dimension 0 of every tensor may vary."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)

    def dims(value: Any) -> Any:
        return {0: torch.export.Dim.AUTO} if isinstance(value, torch.Tensor) and value.dim() else None

    return {name: pytree.tree_map(dims, value) for name, value in bound.arguments.items()}


def _learn_dynamic(program: torch.export.ExportedProgram, spec: InputSpec) -> None:
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    tensors = [p for p in placeholders if isinstance(p.meta.get("val"), torch.Tensor)]
    leaves = spec.tensor_leaves
    if len(tensors) != len(leaves):
        return
    for leaf, node in zip(leaves, tensors, strict=True):
        shape = node.meta["val"].shape
        leaf["dynamic_batch"] = bool(len(shape)) and not isinstance(shape[0], int)


def save_program(program: torch.export.ExportedProgram, path: Path, *, weights: bool = True) -> None:
    """``torch.export.save``; ``weights=False`` stores each parameter and buffer of the state
    dict as one zero broadcast to its shape (a few bytes): the checkpoints hold the weights,
    loaded into it before use. Constants (non-persistent buffers) are kept: no checkpoint has them."""
    if not weights:
        for name, tensor in list(program.state_dict.items()):
            zero = torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)
            is_param = isinstance(tensor, nn.Parameter)
            program.state_dict[name] = nn.Parameter(zero, tensor.requires_grad) if is_param else zero
    with warnings.catch_warnings():  # torch remarks on the shared zero's storage
        warnings.simplefilter("ignore")
        torch.export.save(program, path)


# -- reading back -----------------------------------------------------------------------------------

# Records torch.export.save writes as short text, and the globals a tensor's pickle may name.
_TEXT_RECORDS = frozenset({"version", "archive_format", "archive_version", "byteorder", "serialization_id"})
_TEXT = re.compile(rb"[A-Za-z0-9._-]{1,64}\n?")
_STORAGES = ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
_SAFE_GLOBALS = frozenset(
    {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "collections.OrderedDict"}
    | {f"torch.{kind}Storage" for kind in _STORAGES}
)
_PAYLOAD_CONFIG = re.compile(r"(?:^|/)data/(?:weights|constants)/[^/]+_config\.json$")


def check_pickle_free(path: str | os.PathLike) -> None:
    """Refuse a ``.pt2`` archive that ``torch.export.load`` would unpickle anything but plain
    tensors from: every record must be JSON, short text, raw tensor bytes its config marks
    ``use_pickle: false``, or a tensor pickle naming only tensor-rebuilding globals
    (checked without unpickling). Raises :class:`CheckpointError` naming the record."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a torch.export archive ({e})") from None
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        raw = _raw_tensor_records(archive, infos)
        for info in infos:
            if info.filename not in raw and not _is_plain(info.filename, archive.read(info)):
                raise CheckpointError(
                    f"{path}: record {info.filename!r} is not plain data (JSON, text or tensors): "
                    "refusing to load a program that could run code"
                )


def _raw_tensor_records(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> set[str]:
    """Records that every payload config naming them reads as raw bytes (``use_pickle:
    false``); one that any config marks otherwise, or names twice differently, is not."""
    raw: set[str] = set()
    pickled: set[str] = set()
    for info in infos:
        if not _PAYLOAD_CONFIG.search(info.filename):
            continue
        try:
            entries = json.loads(archive.read(info)).get("config", {})
        except (ValueError, AttributeError):
            continue
        folder = info.filename.rsplit("/", 1)[0]
        for entry in entries.values() if isinstance(entries, dict) else ():
            name = entry.get("path_name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                continue
            if entry.get("use_pickle") is False and "/" not in name:
                raw.add(f"{folder}/{name}")
            else:
                pickled.add(f"{folder}/{name}")
    return raw - pickled


def _is_plain(name: str, content: bytes) -> bool:
    if name.rsplit("/", 1)[-1] in _TEXT_RECORDS and _TEXT.fullmatch(content):
        return True
    try:
        json.loads(content.decode("utf-8"))
        return True
    except (UnicodeDecodeError, ValueError):
        pass
    # A torch.save zip, starting at byte 0 (torch.load reads the head; zipfile would skip a
    # pickle put before the zip): its pickles may name tensor-rebuilding globals only.
    if not content.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as inner:
            if min((i.header_offset for i in inner.infolist()), default=1) != 0:
                return False
            pickles = [n for n in inner.namelist() if n.endswith(".pkl")]
            return bool(pickles) and all(_pickle_globals(inner.read(n)) <= _SAFE_GLOBALS for n in pickles)
    except (zipfile.BadZipFile, ValueError):
        return False


def _pickle_globals(data: bytes) -> set[str]:
    """The globals a pickle names, read statically; ValueError when it cannot be told (a
    ``STACK_GLOBAL`` whose operands are not the string literals just before it)."""
    names: set[str] = set()
    strings: list[str] = []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("GLOBAL", "INST"):
            names.add(str(arg).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL":
            if len(strings) < 2:
                raise ValueError("STACK_GLOBAL without string literal operands")
            names.add(f"{strings[-2]}.{strings[-1]}")
            strings = []
        elif opcode.name in _STRING_OPCODES:
            strings.append(str(arg))
        elif opcode.name not in _MEMO_PUTS:
            strings = []
    return names


_STRING_OPCODES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                             "BINSTRING", "SHORT_BINSTRING"})  # fmt: skip
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})


def load_program(path: str | os.PathLike) -> ExportedModule:
    """The program at ``path`` as a module, after :func:`check_pickle_free`. Weights saved as
    placeholders (:func:`save_program`) stay so until ``load_state_dict`` gives them values."""
    check_pickle_free(path)
    try:
        program = torch.export.load(path)
    except Exception as e:
        raise CheckpointError(f"{path}: torch.export.load failed: {type(e).__name__}: {e}") from None
    return ExportedModule(program.module())


@contextlib.contextmanager
def by_reference(module: nn.Module) -> Iterator[None]:
    """Within it, an :class:`ExportedModule`'s ``load_state_dict`` takes the given tensors as
    its own instead of copying them (one of another dtype or device is converted first): no
    second copy of the weights, for a state dict that nothing writes to afterwards. Other
    modules copy as usual."""
    if not isinstance(module, ExportedModule):
        yield
        return
    module.by_reference = True
    try:
        yield
    finally:
        module.by_reference = False


def _is_placeholder(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1 and 0 in tensor.stride()


class ExportedModule(nn.Module):
    """A thin module around an exported program: ``forward`` calls it; ``train()`` and
    ``eval()`` only set the flag (the program was exported in eval mode and cannot switch:
    its own ``train()`` raises); ``state_dict()`` and ``load_state_dict()`` are the program's,
    under the original model's names (see :func:`by_reference`)."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program
        self.training = False
        self.by_reference = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.program.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        own = self.program.state_dict(keep_vars=True)
        if self.by_reference and not assign:
            state_dict = {
                k: v.to(dtype=own[k].dtype, device=own[k].device)
                if k in own and isinstance(v, torch.Tensor)
                else v
                for k, v in state_dict.items()
            }
            return self.program.load_state_dict(state_dict, strict=strict, assign=True)
        if not assign:  # a placeholder (one zero broadcast) cannot be copied into: memory first, unfilled
            for name in state_dict:
                if name in own and _is_placeholder(own[name]):
                    own[name].data = torch.empty(
                        own[name].shape, dtype=own[name].dtype, device=own[name].device
                    )
        return self.program.load_state_dict(state_dict, strict=strict, assign=assign)


def flat_inputs(module: nn.Module, spec: InputSpec) -> nn.Module:
    """A :class:`FlatInputs` whose ``forward`` has one parameter per tensor, ``input_0``...
    (``torch.export`` binds one dynamic shape per parameter)."""
    names = [f"input_{i}" for i in range(len(spec.tensor_leaves))]

    def forward(self: FlatInputs, *tensors: torch.Tensor) -> Any:
        return FlatInputs.forward(self, *tensors)

    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ["self", *names]]
    forward.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return type("FlatInputs", (FlatInputs,), {"forward": forward})(module, spec)


class FlatInputs(nn.Module):
    """``forward(*tensors)`` calls ``module`` with the ``(args, kwargs)`` the spec's tree makes
    of them (its constants filled in): MLflow's pt2 format takes positional tensors only.
    Made by :func:`flat_inputs`."""

    def __init__(self, module: nn.Module, spec: InputSpec) -> None:
        super().__init__()
        self.module = module
        self.spec = spec

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        leaves = [next(it) if "shape" in leaf else leaf["constant"] for leaf in self.spec.leaves]
        args, kwargs = unflatten(self.spec, leaves)
        return self.module(*args, **kwargs)
