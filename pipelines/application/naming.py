"""How a message names the caller's arguments: as Python keywords (`height`, `overwrite=True`) for the functions, as
flags (`--height`, `--overwrite`) for the commands. The same checks serve both; only the names in their messages
differ."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Naming:
    flags: bool = False

    def __call__(self, name: str) -> str:
        """The argument `name` (a Python keyword) as the caller spells it."""
        return "--" + name.replace("_", "-") if self.flags else name

    def switch(self, name: str) -> str:
        """How the caller turns a boolean argument on, in backticks."""
        return f"`{self(name)}`" if self.flags else f"`{name}=True`"

    def reworded(self, error: Exception, names: Iterable[str]) -> Exception:
        """`error` (a ValueError or TypeError of the library, naming Python keywords in backticks) with `names`
        spelled as the caller spells them."""
        if not self.flags:
            return error
        pattern = re.compile(r"`(" + "|".join(map(re.escape, names)) + r")`")
        return type(error)(pattern.sub(lambda match: f"`{self(match[1])}`", str(error)))


PYTHON = Naming(flags=False)
COMMAND_LINE = Naming(flags=True)
