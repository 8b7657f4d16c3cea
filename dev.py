#!/usr/bin/env python3
"""Developer commands for statekit. Needs only Python 3.10+.

    python3 dev.py demo    run the demo
    python3 dev.py test    run every check: ruff, mypy --strict, pytest with coverage
    python3 dev.py bench   run the benchmarks (optional)

The first run creates a virtual environment in .venv and installs the project with
its development extras into it; later runs reuse it until pyproject.toml changes.
"""

from __future__ import annotations

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
    run(PY, ROOT / "docs" / "examples" / "console_demo.py", *args)


def ensure_redis_server() -> None:
    """The Redis tests start private redis-server processes: install the binary."""
    if shutil.which("redis-server"):
        return
    apt = shutil.which("apt-get")
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0:
        run(apt, "update", "-q")
        run(apt, "install", "-y", "-q", "redis-server")
        return
    sys.exit(
        "the tests need redis-server: install it (on Debian: sudo apt-get install "
        "redis-server) and run again"
    )


def test(args: list[str]) -> None:
    ensure_env()
    ensure_redis_server()
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
