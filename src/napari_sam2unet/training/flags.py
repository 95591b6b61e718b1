"""A command's flag read from its settings dataclass: the name, the default and the type are the field's."""

from __future__ import annotations

import argparse


def add_flag(parser: argparse.ArgumentParser, settings: type, name: str, **options) -> None:
    """--name-with-dashes for the field `name` of `settings`: its default, its type for a number, and
    store_true for a switch; `options` add the rest (help, choices, metavar, nargs)."""
    default = getattr(settings, name)
    if isinstance(default, bool):
        options.setdefault("action", "store_true")
    else:
        options.setdefault("default", default)
        if isinstance(default, int | float) and "choices" not in options:
            options.setdefault("type", type(default))
    parser.add_argument("--" + name.replace("_", "-"), **options)
