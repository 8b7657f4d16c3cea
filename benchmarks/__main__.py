"""Run the benchmarks and print tables of ratios (``--json`` for machine output).

Every contender of a case is measured in the same run as the others; "x" is a
contender's time divided by the time of the case's baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from types import ModuleType
from typing import Any

from . import detector, lifecycle, scaling, session_rw, stores, users, watch, web

CASES: dict[str, ModuleType] = {
    "session": session_rw,
    "detector": detector,
    "stores": stores,
    "lifecycle": lifecycle,
    "scaling": scaling,
    "watch": watch,
    "users": users,
    "web": web,
}


def run_case(case: ModuleType, quick: bool) -> dict[str, Any]:
    groups = []
    for label, measures in case.run(quick=quick):
        base = next(m for m in measures if m.name == case.BASELINE)
        rows = []
        for m in measures:
            row: dict[str, Any] = {"name": m.name}
            if m.per_op is None:
                row["error"] = m.error
            elif m.unit == "bytes":
                row["bytes_per_op"] = round(m.per_op)
            else:
                row["us_per_op"] = round(m.per_op * 1e6, 3)
                if base.per_op:
                    row["times_baseline"] = round(m.per_op / base.per_op, 2)
            rows.append(row)
        checks = [c for t in getattr(case, "TARGETS", ()) if (c := t.check(measures))]
        groups.append({"label": label, "results": rows, "targets": checks})
    return {"case": case.TITLE, "baseline": case.BASELINE, "groups": groups}


def print_case(case: dict[str, Any]) -> None:
    print(f"\n{case['case']} (x = time / time of {case['baseline']})")
    for group in case["groups"]:
        print(f"  {group['label']}")
        for row in group["results"]:
            if "error" in row:
                print(f"    {row['name']:<34} {'fails: ' + row['error']:>19}")
            elif "bytes_per_op" in row:
                print(f"    {row['name']:<34} {row['bytes_per_op']:>10,} bytes")
            else:
                times = row.get("times_baseline", float("nan"))
                print(f"    {row['name']:<34} {row['us_per_op']:>13,.3f} µs {times:>7.2f}x")
        for check in group["targets"]:
            print(f"    {'met' if check['met'] else 'NOT MET'}: {check['target']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("cases", nargs="*", choices=[[], *CASES], help="cases to run (all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and operations")
    args = parser.parse_args(argv)
    names = args.cases or list(CASES)
    if detector.peer_deep_hash() is None and {"session", "detector", "lifecycle"} & set(names):
        print(
            "note: gradio is not installed, so the peer is left out "
            "(pip install -e '.[bench]' adds it)",
            file=sys.stderr,
        )
    results = [run_case(CASES[name], args.quick) for name in names]
    if args.json:
        report = {"python": platform.python_version(), "machine": platform.machine()}
        json.dump({**report, "cases": results}, sys.stdout, indent=2)
        print()
        return
    print(f"Python {platform.python_version()} on {platform.machine()}")
    for case in results:
        print_case(case)


if __name__ == "__main__":
    main()
