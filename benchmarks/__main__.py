"""Run every benchmark and print a table of ratios (``--json`` for machine output)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

from . import session_rw

CASES = [session_rw]


def run_case(case: Any, ops: int) -> dict[str, Any]:
    measures = case.run(ops=ops)
    base = next(m for m in measures if m.name == case.BASELINE)
    return {
        "case": case.TITLE,
        "baseline": case.BASELINE,
        "results": [
            {
                "name": m.name,
                "us_per_op": round(m.per_op * 1e6, 3),
                "times_baseline": round(m.per_op / base.per_op, 2),
            }
            for m in measures
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="fewer operations per round")
    args = parser.parse_args(argv)
    ops = 2_000 if args.quick else 20_000
    cases = [run_case(case, ops) for case in CASES]
    if args.json:
        report = {"python": platform.python_version(), "machine": platform.machine()}
        json.dump({**report, "cases": cases}, sys.stdout, indent=2)
        print()
        return
    print(f"Python {platform.python_version()} on {platform.machine()}")
    for case in cases:
        print(f"\n{case['case']} (x = time / time of {case['baseline']})")
        print(f"  {'contender':<34} {'µs/op':>9} {'x':>7}")
        for row in case["results"]:
            print(f"  {row['name']:<34} {row['us_per_op']:>9.3f} {row['times_baseline']:>7.2f}")


if __name__ == "__main__":
    main()
