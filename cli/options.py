"""click options derived from dataclass fields that carry their command-line metadata.

The options of ``mlflow-ema average`` are declared once, as the fields of
``mlflow_ema.AverageOptions`` (see ``mlflow_ema/average_options.py`` for the metadata);
:func:`options_from` turns fields into click options, each passed to the command under
the field's name, and :func:`values_for` turns the command's keyword arguments back into
the fields' values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def options_from(fields: Iterable[dataclasses.Field]) -> Callable[[F], F]:
    """A decorator adding one click option per field, shown in the fields' order."""
    options = [click_option(f) for f in fields]

    def decorate(func: F) -> F:
        for add in reversed(options):
            func = add(func)
        return func

    return decorate


def click_option(field: dataclasses.Field) -> Callable[[F], F]:
    """The click option of one field: its flags, then the field's name as the parameter name."""
    meta = field.metadata
    kwargs: dict[str, Any] = {"help": meta["help"], "metavar": meta["metavar"]}
    if meta["choices"]:
        kwargs["type"] = click.Choice(list(meta["choices"]))
    elif meta["at_least"] is not None:
        kwargs["type"] = click.IntRange(min=meta["at_least"])
    elif meta["folder"]:
        kwargs["type"] = click.Path(file_okay=False)
    if meta["multiple"]:
        kwargs["multiple"] = True
    if meta["is_flag"]:
        kwargs["is_flag"] = True
    if meta.get("required"):
        kwargs["required"] = True
    if field.default not in (None, ()):
        kwargs["default"] = list(field.default) if meta["multiple"] else field.default
    if meta["show_default"]:
        kwargs["show_default"] = True
    return click.option(*meta["flags"], field.name, **kwargs)


def values_for(fields: Iterable[dataclasses.Field], params: dict[str, Any]) -> dict[str, Any]:
    """The fields' values from the command's parameters (named as the fields), each
    converted by its field's ``convert`` (the command line's text to the field's value)."""
    values = {}
    for f in fields:
        convert = f.metadata["convert"]
        value = params[f.name]
        values[f.name] = convert(value, f.metadata["flags"][0]) if convert else value
    return values
