#!/usr/bin/env python3
"""Developer commands for statekit. Needs only Python 3.10+.

    python3 dev.py demo    serve the demo web app on 127.0.0.1 and print its address
    python3 dev.py test    run every check: ruff, mypy --strict, pytest with coverage
                           (in parallel; -n 0 runs the tests in one process)
    python3 dev.py bench   run the benchmarks (optional)
    python3 dev.py docs    build the docs site into site/ (--serve: serve it on 127.0.0.1)

The first run creates a virtual environment in .venv and installs the project into it,
with what the command needs (the demo: the "web" extra; the tests: the "dev" extra);
later runs reuse it until pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
EXTRAS = "dev"
BENCH_EXTRAS = "dev,bench"
DOCS_EXTRAS = "docs"


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


DEMO_EXTRAS = "web"


def demo(args: list[str]) -> None:
    """Serve the demo until Ctrl+C or SIGTERM, either of which stops it quietly."""
    ensure_env(DEMO_EXTRAS)
    cmd = [str(PY), str(ROOT / "docs" / "examples" / "web_app.py"), *args]
    print("+", " ".join(cmd), flush=True)
    # The server runs in a process group of its own, so that a signal reaches it once:
    # from this process, which forwards Ctrl+C (SIGINT) and SIGTERM alike.
    server: subprocess.Popen[bytes] | None = None
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if server is not None and server.poll() is None:
            server.send_signal(signum if os.name != "nt" else signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    server = subprocess.Popen(cmd, cwd=ROOT, start_new_session=os.name != "nt")
    if stopping:  # a signal came while it started
        server.send_signal(signal.SIGTERM)
    code = server.wait()
    if code != 0 and not (stopping and code in (-signal.SIGINT, -signal.SIGTERM)):
        sys.exit(code if code > 0 else 1)


# Programs the tests start, and the Debian package of each.
TEST_PROGRAMS = {
    "redis-server": "redis-server",
    "redis-sentinel": "redis-sentinel",
    "chromium": "chromium",
}


def ensure_test_programs() -> None:
    """The tests start private redis-server and redis-sentinel processes (redis-cli
    comes with redis-server) and drive Debian's Chromium: install whichever is missing
    (as root, with apt-get), or say how."""
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


def test_workers() -> int:
    """How many pytest processes run the tests: one more than the machine's cores (most
    tests wait on Redis servers, browsers and subprocesses rather than compute), at
    most 4 (each starts private Redis servers of its own); ``STATEKIT_TEST_WORKERS``
    overrides it."""
    chosen = os.environ.get("STATEKIT_TEST_WORKERS", "")
    if chosen:
        if not (chosen.isascii() and chosen.isdigit()):
            sys.exit(f"STATEKIT_TEST_WORKERS must be a whole number, got {chosen!r}")
        return int(chosen)
    return min(4, (os.cpu_count() or 1) + 1)


def test(args: list[str]) -> None:
    ensure_env()
    ensure_test_programs()
    run(PY, "-m", "ruff", "check", ".")
    run(PY, "-m", "ruff", "format", "--check", ".")
    run(PY, "-m", "mypy")
    # The tests run in parallel (pytest-xdist), each worker taking the next test when
    # it is free; "-n 0" runs them in this process (as --pdb needs).
    own = any(
        a.startswith(("-n", "--numprocesses", "--pdb")) or a == "--trace" or "no:xdist" in a
        for a in args
    )
    workers = [] if own else ["-n", str(test_workers()), "--dist", "worksteal"]
    run(PY, "-m", "pytest", *workers, "--cov", "--cov-report=term", *args)


def bench(args: list[str]) -> None:
    ensure_env(BENCH_EXTRAS)
    run(PY, "-m", "benchmarks", *args)


def docs(args: list[str]) -> None:
    """Build the docs site (``mkdocs build --strict``: any warning fails it) into
    ``site/``; with ``--serve``, serve it on 127.0.0.1 and rebuild on changes."""
    ensure_env(DOCS_EXTRAS)
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
    if "--serve" in args:
        rest = [a for a in args if a != "--serve"]
        run(PY, "-m", "mkdocs", "serve", "--strict", "--dev-addr", "127.0.0.1:8001", *rest)
    else:
        run(PY, "-m", "mkdocs", "build", "--strict", *args)
        print(f"the site: {ROOT / 'site' / 'index.html'}")


COMMANDS = {"demo": demo, "test": test, "bench": bench, "docs": docs}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    try:
        COMMANDS[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)


if __name__ == "__main__":
    main()
