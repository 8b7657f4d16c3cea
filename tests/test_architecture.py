"""The shape of the code, as docs/architecture.md draws it: layers that import one way,
no module reaching into another's private names, files of one idea each.

These read the source (with ``ast``), so that a change that breaks the layering fails
here, naming the import, rather than in a reviewer's head.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "statekit"
DOC = PACKAGE.parent / "docs" / "architecture.md"

#: Bottom to top: a module imports (at run time) only modules of lower layers; modules
#: of one layer do not import each other, except where a layer says so.
LAYERS: list[tuple[str, ...]] = [
    ("exceptions",),
    ("_clock", "_fork"),
    ("_checks",),
    ("_copying",),
    ("_changes",),
    ("_codec",),
    ("_browser",),
    ("_locks",),
    ("stores._finish",),
    ("stores.base",),
    ("stores._notices",),
    ("stores._redis*",),  # the Redis store's own modules may use each other
    ("stores._memory_records", "stores._sqlite_file"),
    ("stores.memory", "stores.sqlite", "stores.redis"),
    ("stores",),
    ("_values", "_metrics"),
    ("_host",),
    ("_states",),
    ("_registry",),
    ("_events",),
    ("_steps",),
    ("_core",),
    ("_watch",),
    ("_sessions", "_globals", "_commit", "_remote", "_renewal", "_kept"),
    ("_entry",),
    ("_lease_entry",),
    ("_users",),
    ("_engine_host",),
    ("_declarations",),
    ("_engine",),
    ("web.wire", "web.at_exit", "web.stream"),
    ("web.gate",),
    ("web",),
    ("testing._nodes",),  # redis-server processes, for the cluster and Sentinel helpers
    (
        "testing.fakes",
        "testing.redis_server",
        "testing.browser",
        "testing.redis_cluster",
        "testing.redis_sentinel",
    ),
    ("testing", "__init__"),
    ("pytest_plugin",),  # pytest's fixtures, over statekit.testing
    ("integrations.asgi",),  # the ASGI middleware, which the FastAPI dependency reads
    ("integrations*",),  # each framework's integration, over statekit.web
]
PEERS_MAY_IMPORT = {"stores._redis*"}

#: Private names of other modules that code may use: the standard library's.
ALLOWED_PRIVATE = {"_get_running_loop", "_exit", "_replace", "_at_fork_reinit"}
#: And in one module, redis-py's asyncio pool's, to give a connection back as the pool's
#: public ``get_available_connection`` took it (``_put_back``, which falls back to the
#: pool's own release when they are not there).
ALLOWED_PRIVATE_IN = {
    "stores._redis_wire": {
        "_lock",
        "_re_auth_token",
        "_in_use_connections",
        "_available_connections",
    }
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        # A package's __init__ is named by its package ("stores", "web", "testing").
        found[name.removesuffix(".__init__")] = path
    return found


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        for pattern in layer:
            if module == pattern or (pattern.endswith("*") and module.startswith(pattern[:-1])):
                return index
    raise AssertionError(f"statekit.{module} is in no layer: add it to LAYERS and the doc")


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The statekit module a ``from ... import`` names (without ``statekit.``)."""
    if node.level:
        parts = module.split(".")[: -node.level] if module != "stores" else []
        if module == "stores":  # stores/__init__.py: its package is stores
            parts = ["stores"][: 1 - (node.level - 1)]
        return ".".join([*parts, *([node.module] if node.module else [])])
    return (node.module or "")[len("statekit.") :]


def imports(module: str) -> list[tuple[int, str, str]]:
    """(line, statekit module, name) for every name imported from statekit, at run
    time (not under ``if TYPE_CHECKING:``); name is "" for ``import statekit.x``."""
    tree = ast.parse(modules()[module].read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and (
            node.level or (node.module or "").startswith("statekit")
        ):
            source = _resolve(module, node)
            for alias in node.names:
                whole = f"{source}.{alias.name}" if source else alias.name
                if whole in modules():  # "from . import _fork": the module itself
                    out.append((node.lineno, whole, ""))
                else:
                    out.append((node.lineno, source or "__init__", alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("statekit."):
                    out.append((node.lineno, alias.name[len("statekit.") :], ""))
    return out


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_module_imports_only_lower_layers(module: str) -> None:
    """An import against the layering (say the memory store importing the engine)
    fails here with the line that does it."""
    if module == "__init__":
        return  # the front door re-exports everything
    here = layer_of(module)
    for line, source, _ in imports(module):
        there = layer_of(source)
        peers = there == here and any(p in PEERS_MAY_IMPORT for p in LAYERS[here])
        assert there < here or peers, (
            f"statekit/{module} line {line} imports statekit.{source}, which is not "
            "below it in the layers"
        )


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_uses_another_modules_private_names(module: str) -> None:
    """``engine._x`` from another module, or ``from ._y import _z``: what the engine
    parts, states, events and registries need of each other goes through named
    interfaces (the Host, the Core, the store protocols)."""
    for line, source, name in imports(module):
        assert not name.startswith("_"), (
            f"statekit/{module} line {line} imports {name}, a private name of statekit.{source}"
        )
    for node in ast.walk(ast.parse(modules()[module].read_text())):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in {"self", "cls"}:
            continue
        if node.attr.startswith("__") or node.attr in ALLOWED_PRIVATE:
            continue
        if node.attr in ALLOWED_PRIVATE_IN.get(module, ()):
            continue
        raise AssertionError(
            f"statekit/{module} line {node.lineno} uses {ast.unparse(node)}, a private "
            "name of another object"
        )


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_file_is_one_idea_of_at_most_about_600_lines(module: str) -> None:
    lines = len(modules()[module].read_text().splitlines())
    assert lines <= 650, f"statekit/{module} has {lines} lines: split it by idea"


def test_the_architecture_doc_lists_every_module_in_its_layer_order() -> None:
    """The doc's layer list is the true map: it names every module, and the top-level
    ones in the order of LAYERS."""
    text = DOC.read_text()
    start = text.index("```", text.index("## Layers"))
    block = text[start : text.index("```", start + 3)]
    named = re.findall(r"([A-Za-z_*]+)\.py", block)
    for module in modules():
        short = module.split(".")[-1]
        covered = short in named or (short.startswith("_redis") and "_redis_*" in named)
        package = modules()[module].name == "__init__.py"  # the doc names its folder
        assert covered or package, f"the doc does not name {module}"
    top = [name for name in named if name in modules() and name != "__init__"]
    order = [layer_of(name) for name in top]
    assert order == sorted(order), f"the doc lists the layers out of order: {top}"
