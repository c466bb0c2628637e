"""`--fit-final`: refit each task head on all labelled rows and store it in the run (RUN/heads.json).

The heads come from `training.heads.fit_linear_head` on the frozen OCT embeddings (the modality the
deployed heads take, `input_modality="oct"`), and carry the cross-validated linear-probe metrics of
this evaluation under ``metrics["evaluation"]`` so `retina export` ships them in retina.json.
"""

from __future__ import annotations

import numpy as np

FINAL_MODALITY = "oct"


def fit_final_heads(sources, embeddings, cohort, cfg, results) -> list[str]:
    from training.evaluation.report import clean_json
    from training.heads import fit_linear_head, save_heads

    written = []
    for source in sources:
        if source.run_dir is None or source.key.startswith("baseline"):
            continue  # never write heads into the reference encoder's run
        heads = []
        for task in cfg.tasks:
            y = cohort.labels(task)
            rows = np.flatnonzero(np.isfinite(y))
            head = fit_linear_head(
                task,
                embeddings[source.key][FINAL_MODALITY][rows],
                y[rows],
                seed=cfg.seed,
                groups=cohort.patient_ids[rows],
                input_modality=FINAL_MODALITY,
                # the modality swap on the paired fundus embeddings, so the package records it
                swap_embeddings={"fundus": embeddings[source.key]["fundus"][rows]},
            )
            cv = results["cv"].get(source.key, {}).get("probe", {}).get(FINAL_MODALITY, {}).get(task)
            head.metrics["evaluation"] = clean_json({
                "protocol": f"{cfg.folds}-fold patient-grouped CV, linear probe on frozen "
                f"{FINAL_MODALITY} embeddings",
                "seed": cfg.seed,
                "n_rows": len(rows),
                "n_patients": len(np.unique(cohort.patient_ids[rows])),
                "summary": cv["summary"] if cv else None,
                "folds": cv["folds"] if cv else None,
            })  # the same rounded numbers as results.json
            heads.append(head)
        save_heads(source.run_dir, heads)
        written.append(str(source.run_dir / "heads.json"))
    return written
