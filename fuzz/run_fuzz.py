#!/usr/bin/env python
"""The long fuzz run: `python fuzz/run_fuzz.py --cases 10000` (docs/reliability.md).

Spreads the cases over the targets of fuzz/fuzz_targets.py (DICOM, images, .npy, labels CSV,
cohort manifest CSV, package descriptor retina.json), each case a seeded mutation of a valid file, and
checks the property: an item or a one-line ReadError / ValueError / RetinaError, nothing else.
Every distinct failure (exception type + where it was raised) is printed once with the case number
that reproduces it (`--only TARGET --first N --cases 1`). Exit 0 when no case failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import fuzz_targets  # noqa: E402

# Share of the cases per target (the readers get most).
WEIGHTS = {"dicom": 0.35, "image": 0.25, "npy": 0.1, "labels": 0.1, "manifest": 0.1, "package": 0.1}


class HangError(Exception):
    """A case ran past --hang-seconds."""


def _hang(signum, frame):
    raise HangError("the case did not finish in time (a hang)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="total number of cases (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; case i uses seed + i")
    parser.add_argument("--only", choices=sorted(WEIGHTS), action="append", help="fuzz only these targets")
    parser.add_argument("--first", type=int, default=0, help="case number to start at (to reproduce one)")
    parser.add_argument("--skip-known", action="append", default=[], metavar="TARGET",
                        help="run TARGET but do not count its failures (a known bug owned elsewhere)")
    parser.add_argument("--hang-seconds", type=int, default=60,
                        help="a case running longer than this counts as a hang (default 60)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGALRM, _hang)
    warnings.simplefilter("ignore")  # pydicom / Pillow warnings are not failures; exceptions are

    targets = args.only or list(WEIGHTS)
    total_weight = sum(WEIGHTS[t] for t in targets)
    plan = {t: max(1, round(args.cases * WEIGHTS[t] / total_weight)) for t in targets}
    seeds = fuzz_targets.make_seeds()
    failures: dict[tuple[str, str, str, int], list[int]] = {}
    outcomes: dict[str, Counter] = {t: Counter() for t in targets}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="retina-fuzz-") as tmp:
        workdir = Path(tmp)
        if "package" in targets:
            from fixtures_packages import make_toy_package

            package = make_toy_package(workdir / "toy-package" / "toy")
            fuzz_targets.add_package_seed(seeds, package, workdir)
        for target in targets:
            t0 = time.perf_counter()
            for case in range(args.first, args.first + plan[target]):
                rnd = random.Random(f"{target}:{args.seed + case}")
                signal.alarm(args.hang_seconds)  # a hang is a failure too (reported as HangError)
                try:
                    outcomes[target][fuzz_targets.run_case(target, seeds, rnd, workdir)] += 1
                except Exception as exc:  # the property failed: record where
                    frame = traceback.extract_tb(exc.__traceback__)[-1]
                    key = (target, type(exc).__name__, Path(frame.filename).name, frame.lineno or 0)
                    if key not in failures:
                        print(f"FAIL {target} case {case}: {type(exc).__name__} at {key[2]}:{key[3]}: "
                              f"{' '.join(str(exc).split())[:200]}", flush=True)
                    failures.setdefault(key, []).append(case)
                    outcomes[target]["FAILED"] += 1
                finally:
                    signal.alarm(0)
            counts = ", ".join(f"{k} {v}" for k, v in sorted(outcomes[target].items()))
            print(f"{target:9s} {plan[target]:6d} cases in {time.perf_counter() - t0:6.1f} s: {counts}",
                  flush=True)
    seconds = time.perf_counter() - started
    counted = {k: v for k, v in failures.items() if k[0] not in args.skip_known}
    n_cases = sum(plan.values())
    n_failed = sum(len(v) for v in counted.values())
    print(f"{n_cases} cases, {n_failed} failed ({len(counted)} distinct), {seconds:.1f} s "
          f"({n_cases / seconds:.0f} cases/s)")
    for key, cases in failures.items():
        known = " (known, not counted)" if key[0] in args.skip_known else ""
        print(f"  {key[0]}: {key[1]} at {key[2]}:{key[3]} in {len(cases)} case(s), first {cases[0]}{known}")
    return 1 if counted else 0


if __name__ == "__main__":
    sys.exit(main())
