"""One registry mechanism for everything created by name (tasks today; vision backbones next).

    @TASKS.register("mlm")
    class MaskedLM: ...

    TASKS.get("mlm")                 # the registered object
    TASKS.get("my_pkg.tasks:MyTask") # escape hatch: any importable object by dotted path
    TASKS.names()
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from pretune.errors import RecipeError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Any:
        if name in self._entries:
            return self._entries[name]
        if ":" in name or "." in name:
            return _import_dotted(name, self.kind)
        raise RecipeError(
            f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())} "
            "or give a dotted path 'package.module:Name'"
        )


def _import_dotted(path: str, kind: str) -> Any:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(f"cannot import {kind} {path!r}: {exc}") from None
    return obj


TASKS = Registry("task")
