"""Retrieval of an exported package on any paired cohort manifest, at visit and eye level.

For checking a package on patients it never saw, e.g. a `retina synth` cohort at the default
acquisition sizes (the demo trains on smaller synthetic images):

    retina synth unseen --patients 24 --seed 1002
    python benchmarks/package_retrieval.py --manifest unseen/manifest.csv \
        retina-demo/exported/retina-demo-clip retina-demo/exported/retina-demo-cloob

Prints one line per package and direction (visit top-1, eye hit@1/5/10 with exact chance, MRR) and, with
--json, every number (the schema of retinacli.ranking).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from retinacli.cohort_manifest import read_cohort_manifest
from training.demo import engine_retrieval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("packages", type=Path, nargs="+", help="exported model package folders")
    parser.add_argument("--manifest", type=Path, required=True, help="paired cohort manifest")
    parser.add_argument("--json", action="store_true", help="print every number as JSON")
    args = parser.parse_args()
    rows = read_cohort_manifest(args.manifest)
    results = {str(p): engine_retrieval(p, rows) for p in args.packages}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for package, r in results.items():
        for direction in ("fundus_to_oct", "oct_to_fundus"):
            v, e = r[direction], r["eye_level"][direction]
            print(f"{Path(package).name} {direction}: pool {r['pool_size']}, {r['eye_level']['eyes']} eyes; "
                  f"visit top-1 {v['top1']:.3f} ({v['top1'] / v['chance_top1']:.1f}x chance); eye hit@1/5/10 "
                  f"{e['top1']:.3f}/{e['top5']:.3f}/{e['top10']:.3f} (chance {e['chance_top1']:.3f}/"
                  f"{e['chance_top5']:.3f}/{e['chance_top10']:.3f}; hit@5 "
                  f"{e['top5'] / e['chance_top5']:.2f}x), MRR {e['mrr']:.3f}")


if __name__ == "__main__":
    main()
