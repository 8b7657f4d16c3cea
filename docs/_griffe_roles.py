"""A griffe extension for the docs site: the Sphinx roles of statekit's docstrings
(``:class:`~statekit.StateEngine```, ``:meth:`open```) rendered as links where their
target has a page of the reference, as code otherwise.

A docstring names its targets as Sphinx does: a full path (``statekit.web.Visit``), with
``~`` to show only the last part, or a name relative to the object documented
(``open``, ``StoreNamespace.commit``). A full path to a name of the reference becomes
an autorefs link; anything else (a relative name, the standard library, a private
module) becomes ``code``, so that the site never carries a dangling link.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import griffe

__all__ = ["SphinxRoles"]

_ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj):`(~?)([^`]+)`")

#: The modules whose public names the reference documents.
PUBLIC = (
    "statekit",
    "statekit.stores",
    "statekit.exceptions",
    "statekit.testing",
    "statekit.web",
)


def _documented() -> set[str]:
    """The full paths the reference has a heading for: each public name (read from
    each module's ``__all__``, without importing it: the site needs none of the
    extras)."""
    root = Path(__file__).resolve().parent.parent
    paths: set[str] = set()
    for name in PUBLIC:
        package = root.joinpath(*name.split("."))
        source = package / "__init__.py" if package.is_dir() else package.with_suffix(".py")
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                paths.update(f"{name}.{attr}" for attr in ast.literal_eval(node.value))
    for name in ("asgi", "fastapi", "flask", "django", "prometheus"):
        paths.add(f"statekit.integrations.{name}")
    return paths


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring before it is parsed."""

    def __init__(self) -> None:
        super().__init__()
        self._documented = _documented()

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(self._rewrite, obj.docstring.value)

    def _rewrite(self, match: re.Match[str]) -> str:
        short, target = match.group(1), match.group(2).rstrip("()")
        shown = target.rsplit(".", 1)[-1] if short else target
        if target in self._documented:
            return f"[`{shown}`][{target}]"
        return f"`{shown}`"
