"""A long fault-injection run with a history checker (./dev chaos): does a lock keep one holder?

Starts a lock service of its own (or two, SERVER and SERVER2) in a temporary directory, worker processes
taking exclusive locks on a few records, and a chaos loop killing and stopping workers, lock servers,
the listener, the monitor and whole services; then checks the history the processes logged and prints
the figures and every problem found (tests/dls_testkit/chaos says how). Exit status 0 when the checker
found nothing wrong, 1 otherwise.

Usage: ./dev chaos [--seconds S] [--workers N] [--records N] [--max-hold S] [--timeout S] [--lock-delay S]
                   [--pair] [--seed N] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dls_testkit.chaos import Settings, chaos_run  # tests/ is no package: found through sys.path


def main() -> int:
    parser = argparse.ArgumentParser(prog="./dev chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long faults are injected (default 120)")
    parser.add_argument("--workers", type=int, default=8, help="worker processes (default 8)")
    parser.add_argument("--records", type=int, default=3, help="records they lock (default 3)")
    parser.add_argument("--max-hold", type=float, default=0.3, help="longest critical section, seconds (default 0.3)")
    parser.add_argument("--timeout", type=float, default=5.0, help="the clients' JDLS TIMEOUT, seconds (default 5)")
    parser.add_argument("--lock-delay", type=float, default=None,
                        help="the services' jdls --lock-delay, seconds (default: jdls's)")
    parser.add_argument("--pair", action="store_true", help="two services, SERVER and SERVER2 (default: one)")
    parser.add_argument("--seed", type=int, default=None, help="seed of every random choice (default: the time)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs) and say where")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time())
    settings = Settings(seconds=args.seconds, workers=args.workers, records=args.records, max_hold=args.max_hold,
                        pair=args.pair, seed=seed, timeout=args.timeout,
                        jdls_options=() if args.lock_delay is None else ("--lock-delay", f"{args.lock_delay:g}"))
    base = Path(tempfile.mkdtemp(prefix="dls-chaos-"))
    print(f"chaos: {'SERVER and SERVER2' if args.pair else 'one service'}, {args.workers} workers on "
          f"{args.records} records, sections up to {args.max_hold:g} s, {args.seconds:g} s of faults, seed {seed}",
          flush=True)
    try:
        verdict = chaos_run(base, settings)
    finally:
        if args.keep:
            print(f"chaos: the run's directory (logs/ holds the history): {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(verdict.figures())
    problems = verdict.problems()
    for line in problems:
        print(f"  {line}")
    print("chaos: no overlap, every counter exact" if verdict.ok else "chaos: the checker found problems")
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
