"""What a model's forward takes, captured once in training: the input of its architecture program.

:class:`InputSpec` records the structure of the first forward call's ``(args, kwargs)``
(a ``torch.utils._pytree`` spec, JSON) and, per leaf, a tensor's shape and dtype or a
constant's value. It never keeps the data: examples are made of synthetic values of
those shapes and dtypes (:func:`synthetic_leaves`), unless the user opted in to logging
a real sample (``autolog(log_input_examples=True)``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch.utils import _pytree as pytree

FORMAT_VERSION = 1
SAMPLE_ROWS = 5  # rows of a real sample kept (as mlflow.pytorch.autolog's input examples)
_CONSTANTS = (bool, int, float, str, type(None))  # leaves exported as constants


class UnsupportedInputs(ValueError):
    """The forward's inputs hold something an exported program cannot take."""


@dataclasses.dataclass
class InputSpec:
    """``leaves``: per leaf ``{"shape", "dtype", "dynamic_batch"}`` (a tensor) or
    ``{"constant": value}``; ``tree``: the pytree spec of ``(args, kwargs)``, JSON."""

    leaves: list[dict[str, Any]]
    tree: str
    model_class: str = ""
    real_example: bool = False

    @property
    def tensor_leaves(self) -> list[dict[str, Any]]:
        return [leaf for leaf in self.leaves if "shape" in leaf]

    @property
    def single_tensor(self) -> bool:
        """Is the forward ``model(x)`` with one tensor? (MLflow serves only those.)"""
        args, kwargs = pytree.tree_unflatten(list(range(len(self.leaves))), self.treespec)
        return tuple(args) == (0,) and not kwargs and len(self.leaves) == 1 and "shape" in self.leaves[0]

    @property
    def treespec(self) -> pytree.TreeSpec:
        return pytree.treespec_loads(self.tree)

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> InputSpec:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not an inputs.json of format version {FORMAT_VERSION}")
        leaves = data.get("leaves")
        if not isinstance(leaves, list) or not all(isinstance(leaf, dict) for leaf in leaves):
            raise ValueError("inputs.json: 'leaves' must be a list of objects")
        for leaf in leaves:
            if "shape" in leaf:
                _check_tensor_leaf(leaf)
            elif not isinstance(leaf.get("constant"), _CONSTANTS):
                raise ValueError("inputs.json: a leaf is neither a tensor nor a constant")
        spec = cls(leaves, str(data.get("tree")), str(data.get("model_class", "")),
                   bool(data.get("real_example", False)))  # fmt: skip
        spec.treespec  # noqa: B018  # parse it now: a bad spec is refused here, not when called
        return spec


def _check_tensor_leaf(leaf: dict[str, Any]) -> None:
    shape = leaf["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"inputs.json: bad shape {shape!r}")
    if not isinstance(getattr(torch, str(leaf.get("dtype")), None), torch.dtype):
        raise ValueError(f"inputs.json: unknown dtype {leaf.get('dtype')!r}")


def describe_inputs(args: tuple, kwargs: dict, *, model_class: str = "") -> InputSpec:
    """The :class:`InputSpec` of one forward call; raises :class:`UnsupportedInputs`."""
    leaves, treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    described = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append({"shape": list(leaf.shape), "dtype": str(leaf.dtype).removeprefix("torch."),
                              "dynamic_batch": leaf.dim() > 0})  # fmt: skip
        elif isinstance(leaf, _CONSTANTS):
            described.append({"constant": leaf})
        else:
            raise UnsupportedInputs(
                f"the forward takes a {type(leaf).__name__}, not only tensors and constants"
            )
    if not any("shape" in leaf for leaf in described):
        raise UnsupportedInputs("the forward takes no tensor")
    try:
        tree = pytree.treespec_dumps(treespec)
    except Exception as e:  # a custom container torch cannot serialize
        raise UnsupportedInputs(f"the forward's input structure cannot be recorded ({e})") from None
    return InputSpec(described, tree, model_class)


def real_sample(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The first rows of the call's tensors, on CPU (``log_input_examples=True``)."""
    leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
    return [t.detach()[:SAMPLE_ROWS].to("cpu", copy=True) if t.dim() else t.detach().cpu().clone()
            for t in leaves if isinstance(t, torch.Tensor)]  # fmt: skip


def synthetic_leaves(spec: InputSpec, *, batch: int | None = None) -> list[Any]:
    """Leaves of the spec's shapes and dtypes, of synthetic values (standard normal for
    floats, zeros otherwise: valid token ids and masks), from a private generator (the
    training's random state is left alone). ``batch``: the batch size of the tensors whose
    batch dimension is dynamic (default: as captured, at least 2, since ``torch.export``
    fixes a size-1 dimension)."""
    generator = torch.Generator().manual_seed(0)
    leaves = []
    for leaf in spec.leaves:
        if "shape" not in leaf:
            leaves.append(leaf["constant"])
            continue
        shape = list(leaf["shape"])
        if shape and leaf.get("dynamic_batch"):
            shape[0] = batch if batch is not None else max(2, shape[0])
        dtype = getattr(torch, leaf["dtype"])
        if dtype.is_floating_point:
            leaves.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            leaves.append(torch.zeros(shape, dtype=dtype))
    return leaves


def with_tensors(spec: InputSpec, tensors: list[torch.Tensor]) -> list[Any]:
    """The spec's leaves, its tensors replaced by ``tensors`` in order (a real sample)."""
    it = iter(tensors)
    return [next(it) if "shape" in leaf else leaf["constant"] for leaf in spec.leaves]


def unflatten(spec: InputSpec, leaves: list[Any]) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the call the leaves make."""
    args, kwargs = pytree.tree_unflatten(leaves, spec.treespec)
    return tuple(args), dict(kwargs)
