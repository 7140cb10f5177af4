"""`python -m tests.lab`: list labs on this machine, or sweep away those aborted runs left behind.

    python -m tests.lab --list            every lab (live or orphaned) and its namespaces
    python -m tests.lab --cleanup         remove orphaned labs (their owner process is gone)
    python -m tests.lab --cleanup --all   remove every lab, even ones a running test owns

Run it as root from the repository root. It must never touch anything not named like a lab
(`wn` + 6 hex digits + `-`, see tests/lab/sweep.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from tests.lab import sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.lab", description="List lab leftovers, or sweep away those of aborted runs."
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="show labs and whether their owner runs")
    action.add_argument("--cleanup", action="store_true", help="remove orphaned labs")
    parser.add_argument("--all", action="store_true", help="with --cleanup: remove live labs too")
    args = parser.parse_args(argv)
    if args.all and not args.cleanup:
        parser.error("--all goes with --cleanup")
    if os.geteuid() != 0:
        print("python -m tests.lab: must run as root (it manages network namespaces)", file=sys.stderr)
        return 2

    if args.list:
        labs = sweep.lab_namespaces()
        ids = sorted(set(labs) | set(sweep.lock_files()))
        for lab_id in ids:
            state = "live" if sweep.owner_alive(lab_id) else "ORPHANED"
            print(f"{lab_id} {state:8} {' '.join(labs.get(lab_id, [])) or '(no namespaces)'}")
        if not ids:
            print("no labs")
        return 0

    report = sweep.sweep_labs(include_live=args.all)
    print(report)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
