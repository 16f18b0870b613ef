"""Reading configuration from environment variables, and turning user mistakes into one clear line.

Every script reads its settings through these helpers, so `N_LAYER=abc` fails the same way
everywhere: one line that names the variable, exit code 1, no traceback.
"""

import functools
import os
import sys


class UserError(Exception):
    """A problem the user can fix (a bad setting, a missing file): printed as one line, exit 1."""


def _raw(name):
    value = os.environ.get(name, "").strip()
    return value or None


def is_set(name):
    """True when the variable holds a non-empty value."""
    return _raw(name) is not None


def env_str(name, default):
    value = _raw(name)
    return default if value is None else value


def env_int(name, default, minimum=1):
    """An integer setting; scientific notation such as 1e8 is accepted when it is whole."""
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


def env_flag(name, default=False):
    """A yes/no setting: 1/true/yes/on or 0/false/no/off."""
    value = _raw(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{name} must be 0 or 1, got {value!r}")


def cli(main):
    """Decorate a script's main(): UserError becomes one line on stderr and exit code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"Error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)
        except KeyboardInterrupt:
            print("\nInterrupted.", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapper
