"""Runs every fenced Python block of one page of the docs (or the README), top to
bottom, as a reader would: ``python tests/_doc_blocks.py docs/guide.md``.

A page's blocks share one namespace, in order. Three kinds of block:

- a block right after a line ending in ```` `NAME.py`: ```` is that file of the reader's
  project: it is written to a scratch folder (on ``sys.path``) rather than run;
- a block that defines ``test_...`` functions is a test module: it is written there
  too, and pytest runs every such module of the page at the end, with statekit's
  plugin (``-p statekit.pytest_plugin``), as the page says to;
- any other block runs.

Blocks that reach Redis name example addresses; they run against the test servers,
whose URLs come in ``DOCS_REDIS_URL`` and ``DOCS_CLUSTER_URL`` (each example address is
replaced, in the code only). ``docs/examples`` is on ``sys.path``, as it is for a
reader who runs the examples from there. Exits non-zero, naming the block, if a block
raises or a test module fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^( *)```python[^\n]*\n(.*?)^\1```", re.S | re.M)
FILE_LABEL = re.compile(r"`([A-Za-z_][\w]*\.py)`:\s*$")
TEST_FUNCTION = re.compile(r"^(async )?def test_\w+", re.M)

#: Example addresses in the docs, and the test server each stands for.
ADDRESSES = {
    "redis+cluster://10.0.0.5:7000,10.0.0.6:7000": "DOCS_CLUSTER_URL",
    "redis://10.0.0.5:6379/0": "DOCS_REDIS_URL",
    "redis://127.0.0.1:6379/0": "DOCS_REDIS_URL",
}


def blocks(page: Path) -> list[tuple[int, str | None, str]]:
    """(line, file name or None, code) of each Python block of ``page``."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        line = text[: match.start()].count("\n") + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        label = FILE_LABEL.search(before)
        code = textwrap.dedent(match.group(2))  # a block in a list item is indented
        found.append((line, label.group(1) if label else None, code))
    return found


def with_test_servers(code: str) -> str:
    for address, variable in ADDRESSES.items():
        if address in code:
            url = os.environ.get(variable)
            if not url:
                raise SystemExit(f"{variable} is not set: a block needs that test server")
            code = code.replace(address, url)
    return code


def main(page_name: str) -> int:
    page = ROOT / page_name
    scratch = Path(tempfile.mkdtemp(prefix="statekit-docs-"))
    os.chdir(scratch)  # files a block makes (state.db) go there
    sys.path[:0] = [str(scratch), str(ROOT / "docs" / "examples")]
    namespace: dict[str, object] = {"__name__": "__main__"}
    tests: list[str] = []
    for line, file_name, code in blocks(page):
        where = f"{page_name}:{line}"
        code = with_test_servers(code)
        if file_name is None and TEST_FUNCTION.search(code):
            file_name = f"test_block_{line}.py"
        if file_name is not None:
            (scratch / file_name).write_text(code, encoding="utf-8")
            if file_name.startswith("test_"):
                tests.append(file_name)
            print(f"wrote {where} as {file_name}")
            continue
        try:
            exec(compile(code, where, "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED: the block at {where}", file=sys.stderr)
            return 1
        print(f"ran {where}")
    if tests:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "statekit.pytest_plugin",
                "-p",
                "no:cacheprovider",
                *tests,
            ],
            cwd=scratch,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:2])},
            check=False,
        )
        if run.returncode != 0:
            print(f"FAILED: the tests of {page_name}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
