"""``--help`` without Typer's type noise.

Typer (0.2x) prints every option's Python type in angle brackets, ``<bool>`` even for flags such as
``--help`` and ``--dry-run``, ``<str>`` for text and ``<list[str]>`` for a repeatable option, and
puts a required argument in braces in the usage line (``dataport token [OPTIONS] {user}``). This
module makes help read as click's does: no type for a flag, ``TEXT``, ``INTEGER``, ``PATH`` or the
choices (``CSV|JSON|…``) for a value, and ``USER`` for an argument. It patches three methods of
Typer's parameter classes, where they exist, once; ``tests/test_first_hour.py`` checks every
command's help, so a Typer upgrade that changes these hooks fails a test rather than the output.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import typer.core

# Typer's bare type names, as click names them.
_TYPE_NAMES = {
    "str": "TEXT",
    "int": "INTEGER",
    "float": "FLOAT",
    "bool": "BOOLEAN",
    "path": "PATH",
    "file": "FILE",
    "directory": "DIRECTORY",
    "datetime": "DATETIME",
    "uuid": "UUID",
}


def plain_type(label: str | None) -> str | None:
    """``<list[str]>`` -> ``TEXT``, ``<int range>`` -> ``INTEGER``, ``<csv|json>`` -> ``CSV|JSON``."""
    if label is None or not (label.startswith("<") and label.endswith(">")):
        return label
    inner = label[1:-1]
    if match := re.fullmatch(r"list\[(.*)\]", inner):
        inner = match.group(1)
    inner = inner.removesuffix(" range")
    if "|" in inner:
        return inner.upper()
    return _TYPE_NAMES.get(inner, inner.upper())


def _option_type(original: Callable[..., str | None]) -> Callable[..., str | None]:
    @functools.wraps(original)
    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None  # a flag takes no value: nothing to say
        if self.metavar is not None:
            return self.metavar
        return plain_type(original(self, ctx))

    return display_type_rich


def _argument_type(original: Callable[..., str | None]) -> Callable[..., str | None]:
    @functools.wraps(original)
    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None  # the name (USER, FILE) says it

    return display_type_rich


def _argument_usage(original: Callable[..., str]) -> Callable[..., str]:
    @functools.wraps(original)
    def usage_name(self: Any) -> str:
        name = (self.metavar or self.name or "").upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 else "")

    return usage_name


@functools.cache
def plain_help_types() -> None:
    """Patch Typer's help (once a process): see the module's docstring."""
    option, argument = getattr(typer.core, "TyperOption", None), getattr(typer.core, "TyperArgument", None)
    if option is not None and hasattr(option, "display_type_rich"):
        option.display_type_rich = _option_type(option.display_type_rich)
    if argument is not None:
        if hasattr(argument, "display_type_rich"):
            argument.display_type_rich = _argument_type(argument.display_type_rich)
        if hasattr(argument, "_usage_display_name"):
            argument._usage_display_name = _argument_usage(argument._usage_display_name)
        if isinstance(getattr(argument, "display_name_raw", None), property):
            argument.display_name_raw = property(lambda self: (self.metavar or self.name or "").upper())
