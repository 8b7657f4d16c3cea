#!/usr/bin/env python3
"""Developer commands for statekit. Needs only Python 3.10+.

    python3 dev.py demo    serve the demo web app on 127.0.0.1 and print its address
    python3 dev.py test    run every check: ruff, mypy --strict, pytest with coverage
    python3 dev.py bench   run the benchmarks (optional)

The first run creates a virtual environment in .venv and installs the project with
its development extras into it; later runs reuse it until pyproject.toml changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
EXTRAS = "dev"
BENCH_EXTRAS = "dev,bench"


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def make_venv() -> None:
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    except subprocess.CalledProcessError:
        shutil.rmtree(VENV, ignore_errors=True)
        apt = shutil.which("apt-get")
        if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
            # Debian splits venv support out of the interpreter package.
            ver = f"python3.{sys.version_info.minor}-venv"
            run(apt, "update", "-q")
            run(apt, "install", "-y", "-q", ver)
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        else:
            sys.exit(
                "could not create a virtual environment: install your distribution's venv "
                f"package (on Debian: sudo apt-get install python3.{sys.version_info.minor}-venv)"
            )


def ensure_env(extras: str = EXTRAS) -> None:
    """Create .venv and install the project, once per change of pyproject.toml."""
    stamp = VENV / f".statekit-installed-{extras.replace(',', '-')}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and PY.exists():
        return
    if not PY.exists():
        make_venv()
    run(PY, "-m", "pip", "install", "-q", "--upgrade", "pip")
    run(PY, "-m", "pip", "install", "-q", "-e", f".[{extras}]")
    stamp.write_text(digest)


def demo(args: list[str]) -> None:
    ensure_env()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C stops the server
        run(PY, ROOT / "docs" / "examples" / "web_app.py", *args)


# Programs the tests start, and the Debian package of each.
TEST_PROGRAMS = {"redis-server": "redis-server", "chromium": "chromium"}


def ensure_test_programs() -> None:
    """The tests start private redis-server processes and drive Debian's Chromium:
    install whichever is missing (as root, with apt-get), or say how."""
    missing = [pkg for program, pkg in TEST_PROGRAMS.items() if not shutil.which(program)]
    if not missing:
        return
    apt = shutil.which("apt-get")
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        run(apt, "update", "-q")
        run(apt, "install", "-y", "-q", *missing)
        return
    sys.exit(
        f"the tests need {', '.join(missing)}: install them (on Debian: sudo apt-get "
        f"install {' '.join(missing)}) and run again"
    )


def test(args: list[str]) -> None:
    ensure_env()
    ensure_test_programs()
    run(PY, "-m", "ruff", "check", ".")
    run(PY, "-m", "ruff", "format", "--check", ".")
    run(PY, "-m", "mypy")
    run(PY, "-m", "pytest", "--cov", "--cov-report=term", *args)


def bench(args: list[str]) -> None:
    ensure_env(BENCH_EXTRAS)
    run(PY, "-m", "benchmarks", *args)


COMMANDS = {"demo": demo, "test": test, "bench": bench}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    try:
        COMMANDS[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)


if __name__ == "__main__":
    main()
