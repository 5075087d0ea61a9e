"""The checks of public arguments, written once: each returns the value (as the type it stands for) or raises an error
naming the argument, what was expected and what was received. The library, the commands and the demo use them all."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def is_number(value: Any) -> bool:
    """A real number (an int or a float), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    check_range(name, value, minimum, maximum, "an int")
    return value


def check_number(
    name: str, value: Any, minimum: float | None = None, maximum: float | None = None, above: float | None = None
) -> float:
    """A finite real number in [minimum, maximum] and, when `above` is given, greater than it."""
    if not is_number(value):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}")
    if above is not None and not value > above:
        raise ValueError(f"`{name}` must be a number > {above!r}, got {value!r}")
    check_range(name, value, minimum, maximum, "a number")
    return float(value)


def check_range(name: str, value: float, minimum: float | None, maximum: float | None, kind: str) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"`{name}` must be {kind} in [{minimum!r}, {maximum!r}], got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be {kind} >= {minimum!r}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be {kind} <= {maximum!r}, got {value!r}")


def check_scale(name: str, value: Any) -> float:
    """A guidance scale: a finite real number >= 0."""
    if not is_number(value):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value}")
    return float(value)


def check_fraction(name: str, value: Any) -> float:
    """A fraction of sampling progress in [0, 1]."""
    if not is_number(value):
        raise TypeError(f"`{name}` must be a real number in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def check_seed(name: str, value: Any) -> int:
    """A random seed: an integer in [0, 2**63 - 1] (what `torch.Generator.manual_seed` takes on every device)."""
    return check_int(name, value, minimum=0, maximum=2**63 - 1)


def check_image_side(name: str, value: Any, multiple: int) -> int | None:
    """An image height or width in pixels: None (the model's default) or a positive multiple of `multiple`."""
    if value is None:
        return None
    check_int(name, value, minimum=1)
    if value % multiple:
        raise ValueError(f"`{name}` must be a multiple of {multiple} (the model's latent grid), got {value}")
    return value
