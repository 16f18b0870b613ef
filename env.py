"""This module reads settings from environment variables and turns user mistakes into one clear line.

settings.py lists every setting as a dataclass field; `read()` fills such a dataclass from the
environment, so `N_LAYER=abc` fails the same way everywhere: one line that names the variable,
exit code 1, no traceback. `cli` wraps every script's main() to print those lines, and warns once
about a set variable that looks like a misspelled setting (`MAX_STEP=100` would be ignored).
"""

import argparse
import dataclasses
import functools
import os
import sys


class UserError(Exception):
    """A problem the user can fix (a bad setting, a missing file): printed as one line, exit 1."""


def reason(error):
    """Return the first line of an exception's message (its type's name if it has none), for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _raw(name):
    value = os.environ.get(name, "").strip()
    return value or None


def is_set(name):
    """Return True when the variable holds a non-empty value."""
    return _raw(name) is not None


def env_str(name, default):
    value = _raw(name)
    return default if value is None else value


def env_int(name, default, minimum=1):
    """Read an integer setting; scientific notation such as 1e8 is accepted when it is whole."""
    value = _raw(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        try:
            as_float = float(value)
        except ValueError:
            raise UserError(f"{name} must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise UserError(f"{name} must be a whole number, got {value!r}") from None
        number = int(as_float)
    if minimum is not None and number < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value!r}")
    return number


def env_float(name, default, minimum=0.0):
    value = _raw(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value!r}")
    return number


ON_WORDS = ("1", "true", "yes", "on")
OFF_WORDS = ("0", "false", "no", "off")


def on_off(value):
    """Return True, False, or None when `value` is no yes/no word: the one parser of on/off flags."""
    lowered = value.strip().lower()
    return True if lowered in ON_WORDS else False if lowered in OFF_WORDS else None


def env_flag(name, default=False):
    """Read a yes/no setting: 1/true/yes/on or 0/false/no/off; anything else is a UserError."""
    value = _raw(name)
    if value is None:
        return default
    flag = on_off(value)
    if flag is None:
        raise UserError(f"{name} must be 0 or 1, got {value!r}")
    return flag


def setting(default, minimum=None):
    """Declare a settings field whose smallest allowed value is not the usual one (1 for int, 0 for float)."""
    return dataclasses.field(default=default, metadata={"minimum": minimum})


READERS = {int: env_int, float: env_float, str: env_str, bool: env_flag}


def read(cls, only=None):
    """Fill the settings dataclass `cls`, each field from the variable of its name in capitals
    (only the fields named in `only`, when given: the others keep their defaults)."""
    values = {}
    for field in dataclasses.fields(cls):
        if only is not None and field.name not in only:
            continue
        limits = {"minimum": field.metadata["minimum"]} if "minimum" in field.metadata else {}
        values[field.name] = READERS[field.type](field.name.upper(), field.default, **limits)
    return cls(**values)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is one `Error: ...` line and exit 1 like every other mistake."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def cli(main):
    """Decorate a script's main(): warn about misspelled settings first; a UserError becomes one
    line on stderr and exit code 1, Ctrl-C exit code 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            import settings  # here, not at the top: settings.py reads its variables through this module

            settings.warn_misspelled()
            return main(*args, **kwargs)
        except UserError as error:
            print(f"Error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)
        except KeyboardInterrupt:
            print("\nInterrupted.", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
