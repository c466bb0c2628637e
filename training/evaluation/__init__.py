"""Downstream evaluation of contrastive encoders (`retina evaluate`).

Data flow: manifest -> preprocessed arrays (training.data) -> embeddings per encoder source
(features) -> patient-grouped folds (folds) -> linear probe (probe, via training.heads) and
fine-tuning (finetune) -> metrics (metrics) -> retrieval on held-out patients (retrieval) ->
results.json / results.md / folds.csv (report) and PNG figures (figures). The orchestration lives
in `protocol.run_evaluation`. See docs/evaluation.md.
"""

from training.evaluation.config import EvalConfig

__all__ = ["EvalConfig"]
