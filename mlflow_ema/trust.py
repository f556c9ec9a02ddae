"""Which code mlflow-ema may import: only code the person running it names.

A tracking server is shared and often unauthenticated, so a run's tags are data written
by anyone. A callable recorded on a run (``mlflow_ema.model_factory``, a LightningModule's
``mlflow_ema.model_class``) is imported only when its module is under a prefix the user
trusts: ``--trust-module PREFIX`` (repeatable), the config key ``trust_module``, or
``$MLFLOW_EMA_TRUST_MODULES`` (comma-separated). A callable the user gives themselves
(``--model-factory``, ``--eval``, ``--update-bn``) is theirs and needs no prefix.

For a recorded callable ``"pkg.module:name"``:

- the prefix matches at dot boundaries (``mypkg`` covers ``mypkg.models``, not ``mypkg_evil``);
- ``name`` is one identifier (``pkg.mod:torch.hub.load`` would walk into another package);
- the object found must itself come from a trusted module (its ``__module__``), so a name
  that a trusted module merely imported (``from os import system``) is refused.

The working directory is put on ``sys.path`` only while importing a trusted module.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mlflow_ema.errors import MlflowEmaError, UntrustedCodeError

TRUST_ENV = "MLFLOW_EMA_TRUST_MODULES"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def trusted_prefixes(given: Iterable[str] = ()) -> tuple[str, ...]:
    """The module prefixes the user trusts: ``given`` (``--trust-module``, the config file)
    plus ``$MLFLOW_EMA_TRUST_MODULES``. Each must be a dotted module name."""
    env = [p.strip() for p in os.environ.get(TRUST_ENV, "").split(",") if p.strip()]
    prefixes: list[str] = []
    for prefix in [*given, *env]:
        prefix = str(prefix).strip()
        if not _MODULE.fullmatch(prefix):
            raise UntrustedCodeError(
                f"--trust-module / {TRUST_ENV} takes dotted module names such as 'mypkg' or "
                f"'mypkg.models', got {prefix!r}"
            )
        if _standard_library(prefix):
            raise UntrustedCodeError(
                f"--trust-module {prefix}: the standard library builds no models (and can run commands); "
                "trust the package that holds your model code"
            )
        if prefix not in prefixes:
            prefixes.append(prefix)
    return tuple(prefixes)


def is_trusted(module: str, prefixes: Iterable[str]) -> bool:
    """``module`` is one of ``prefixes`` or inside one (at a dot boundary)."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def split_spec(spec: str) -> tuple[str, str]:
    """``"package.module:attribute"`` as (module, attribute)."""
    module, _, attribute = str(spec).partition(":")
    if not module or not attribute:
        raise MlflowEmaError(f"{spec!r} is not of the form 'package.module:function'")
    return module, attribute


def check_recorded(spec: str, prefixes: Iterable[str], *, what: str) -> None:
    """Refuse, before any import, a callable recorded on a run that the user does not trust.
    ``what`` names where it was recorded (e.g. "run 1a2b... recorded model factory")."""
    module, attribute = split_spec(spec)
    if not _MODULE.fullmatch(module) or not _IDENTIFIER.fullmatch(attribute):
        raise UntrustedCodeError(
            f"{what} {spec!r}, which is not of the form 'package.module:name' (one name after ':'); "
            "give --model-factory to rebuild the model"
        )
    if module == "__main__":
        raise UntrustedCodeError(
            f"{what} {spec!r}: a class defined in the training script cannot be imported later; "
            "give --model-factory MODULE:FUNCTION"
        )
    if not is_trusted(module, prefixes):
        how = (
            f"{module.split('.')[0]} is the standard library, which --trust-module never covers: give --model-factory"
            if _standard_library(module)
            else f"if {module} is your own code, pass --trust-module {module.split('.')[0]} (or set {TRUST_ENV}); "
            "else give --model-factory"
        )
        raise UntrustedCodeError(
            f"{what} {spec!r}; mlflow-ema imports code named by a run only if you trust it: {how}"
        )


def resolve_callable(
    spec: str, *, trusted: Iterable[str] | None = None, what: str = ""
) -> Callable[..., Any]:
    """The callable ``"package.module:attribute"`` names.

    ``trusted=None``: the user named it (an option they typed); the attribute may be dotted
    (``mod:Class.create``). Otherwise it was recorded on a run: :func:`check_recorded` runs
    first, and the object found must come from a trusted module too.
    """
    module_name, attribute = split_spec(spec)
    if trusted is not None:
        trusted = tuple(trusted)
        check_recorded(spec, trusted, what=what or "a run recorded")
    try:
        with _working_directory_importable():
            target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except ImportError as e:
        raise MlflowEmaError(
            f"cannot import {spec!r}: {e} (run from the folder that holds it, or put that folder on PYTHONPATH)"
        ) from None
    except AttributeError as e:
        raise MlflowEmaError(f"cannot import {spec!r}: {e}") from None
    if trusted is not None and not is_trusted(getattr(target, "__module__", None) or "", trusted):
        raise UntrustedCodeError(
            f"{what or 'a run recorded'} {spec!r}, which is defined in module "
            f"{getattr(target, '__module__', None)!r}, not under a trusted prefix ({', '.join(trusted)})"
        )
    if not callable(target):
        raise MlflowEmaError(f"{spec!r} is not callable")
    return target


def _standard_library(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


@contextlib.contextmanager
def _working_directory_importable() -> Iterator[None]:
    """The working directory on ``sys.path`` for one import (as ``python -m`` has it), then off."""
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)
