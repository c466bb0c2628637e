"""How many items of a store its package flagged as out of distribution, per input folder and modality.

    retina embed held/ odd/ --model PKG --store st --json > /dev/null
    python scripts/ood_rates.py st          # folder  modality  flagged/items  lowest and highest score

The folder is the first component of each row's stored path (the root given to `retina embed`), so
embedding one folder per kind of input (held-out cohort, odd images, real exports) measures each.
A store keeps the combined flag: "by embedding" counts scores below the threshold, "by input only"
the other flagged rows (the input check of retinacli.ood).

    python scripts/ood_rates.py --model PKG held/ odd/ real/

reads and checks the folders directly with the package (no store), counting each check on its own
(embedding, input, either) and listing every item of a folder of at most --list items with the
reason. Used for the numbers in docs/reliability.md "Predictions: out of distribution".
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

from retinacli.store import EmbeddingStore


def _pct(n: int, of: int) -> str:
    return f"{n}/{of} ({100 * n / of:.1f} %)"


def store_rates(store_dir: str) -> None:
    """Per folder and modality of a store: flagged in all, by the embedding, by the input check only."""
    from retinacli.engine import Engine
    from retinacli.package import locate_store_package

    store = EmbeddingStore.open(store_dir)
    record = store.package_record or {}
    package, _why = locate_store_package(store.model_id, record.get("path"))
    thresholds = Engine.load(package).ood.thresholds if package is not None else None
    groups: dict[tuple[str, str], list[tuple[float, bool]]] = defaultdict(list)
    for row in store.metadata():
        if row.get("ood") is None:
            continue  # no check: an older row, or a package without a reference
        folder = str(row["path"]).split("/")[0]
        groups[(folder, row["modality"])].append((float(row["ood_score"]), bool(row["ood"])))
    if not groups:
        print("no rows with an out-of-distribution score in this store")
    for (folder, modality), scored in sorted(groups.items()):
        flagged = sum(flag for _, flag in scored)
        scores = [s for s, _ in scored]
        split = ""
        if thresholds is not None:
            by_embedding = sum(s < thresholds[modality] for s, _ in scored)
            split = f" (by embedding {by_embedding}, by input only {flagged - by_embedding})"
        print(f"{folder}\t{modality}\t{_pct(flagged, len(scored))} flagged{split}"
              f"\tscores {min(scores):.3f}-{max(scores):.3f}")


def model_rates(package: str, folders: list[str], listed: int) -> None:
    """Read every item under each folder, embed it with the package and apply both checks."""
    from pathlib import Path

    import numpy as np

    from retinacli.engine import Engine
    from retinacli.errors import ReadError
    from retinacli.pipeline import discover_with_readers, read_with_readers

    engine = Engine.load(package)
    ood = engine.ood
    if ood is None:
        raise SystemExit(f"{package}: no out-of-distribution check in this package")
    ranges = ", ".join(ood.inputs) or "no modality (exported before the input check)"
    print(f"{engine.model_id}: thresholds " + ", ".join(f"{m} {t:.3f}" for m, t in ood.thresholds.items())
          + f"; input ranges for {ranges}")
    for folder in folders:
        sources, _errors = discover_with_readers([Path(folder)])
        results: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        for source in sources:
            for item in read_with_readers(source, None):
                if isinstance(item, ReadError):
                    continue
                array = engine.preprocess(item)[None]
                vector = np.asarray(engine.embed(item.modality, array), dtype=np.float32)
                checks = ood.check(item.modality, vector, array)
                if checks:
                    results[item.modality].append((Path(item.path).name, checks[0]))
        for modality, checked in sorted(results.items()):
            n = len(checked)
            emb = sum(c.below_threshold for _, c in checked)
            inp = sum(c.input_failure is not None for _, c in checked)
            either = sum(c.flag for _, c in checked)
            print(f"{Path(folder).name}\t{modality}\tflagged {_pct(either, n)}: by embedding {_pct(emb, n)}, "
                  f"by input {_pct(inp, n)}")
            if n <= listed:
                for name, c in checked:
                    why = ood.reason(modality, c.score, engine.model_id, c).split(": ", 1)[1]
                    print(f"    {name}\tscore {c.score:.3f}\t{'FLAGGED ' + why if c.flag else 'not flagged'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="an embedding store (format 4) made by 'retina embed'; "
                        "with --model: folders of inputs")
    parser.add_argument("--model", help="a model package: check the folders' items directly")
    parser.add_argument("--list", type=int, default=10, help="list the items of folders this small")
    args = parser.parse_args()
    if args.model:
        model_rates(args.model, args.paths, args.list)
    else:
        for store in args.paths:
            store_rates(store)


if __name__ == "__main__":
    main()
