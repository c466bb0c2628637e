"""Fine-tuning pieces: the frozen/trainable split is exact, and zero epochs reproduce the linear probe."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from training.config import resolve_config  # noqa: E402
from training.evaluation.finetune import (  # noqa: E402
    FinetuneSettings,
    finetune_fold,
    frozen_features,
    resolve_scope,
    split_encoder,
)
from training.heads import fit_linear_head  # noqa: E402
from training.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(resolve_config("tiny")).eval()


def test_split_encoder_reproduces_the_encoder(tiny_model):
    cases = (
        (tiny_model.oct_encoder, torch.randn(3, 1, 4, 32, 32)),
        (tiny_model.fundus_encoder, torch.randn(3, 3, 32, 32)),
    )
    for encoder, x in cases:
        frozen, upper = split_encoder(encoder, "top")
        with torch.no_grad():
            assert torch.allclose(F.normalize(upper(frozen(x)), dim=-1), encoder(x), atol=1e-6)
        trainable = {id(p) for p in upper.parameters()}
        assert trainable.isdisjoint({id(p) for p in frozen.parameters()})
        assert {id(p) for p in encoder.backbone.layer4.parameters()} <= trainable
        assert split_encoder(encoder, "full") == (None, encoder)
    assert resolve_scope("auto", "cpu") == "top" and resolve_scope("auto", "cuda:0") == "full"
    with pytest.raises(ValueError, match="scope"):
        resolve_scope("half", "cpu")


@pytest.mark.parametrize("task", ["cst", "tn"])
def test_zero_epochs_equals_the_probe_and_one_epoch_stays_close(tiny_model, task):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 1, 4, 32, 32)).astype(np.float32)
    with torch.no_grad():
        emb = tiny_model.encode_oct(torch.from_numpy(x)).numpy().astype(np.float64)
    if task == "cst":  # a label the frozen embedding can express, in µm
        y = 300 + 2000 * (emb @ rng.normal(size=emb.shape[1])) / np.sqrt(emb.shape[1])
    else:
        y = (np.arange(16) % 2).astype(float)
    train, test = np.arange(16) < 12, np.arange(16) >= 12
    head = fit_linear_head(task, emb[train], y[train])
    kind = "regression" if task == "cst" else "binary"
    frozen, upper = split_encoder(tiny_model.oct_encoder, "top")
    feats = frozen_features(frozen, x, 8, "cpu")
    before = [p.detach().clone() for p in tiny_model.parameters()]

    def run(epochs):
        return finetune_fold(
            upper, kind, feats[train], y[train], feats[test], head.weight, head.bias, emb[train],
            FinetuneSettings(epochs=epochs, batch_size=4), seed=0,
        )

    pred0, threshold0 = run(0)
    assert np.allclose(pred0, head.predict(emb[test]), rtol=1e-4, atol=1e-4)
    pred1, threshold1 = run(1)
    assert np.all(np.isfinite(pred1)) and not np.allclose(pred1, pred0)
    if kind == "binary":
        assert 0 <= threshold1 <= 1 and np.all((pred1 >= 0) & (pred1 <= 1))
    else:
        assert threshold0 is None and threshold1 is None
        assert np.abs(pred1 - pred0).max() < 0.5 * np.std(y)  # adapts, does not overwrite
    # the source encoder is never modified (fine-tuning works on a copy)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters(), strict=True))
    assert np.array_equal(run(1)[0], pred1)  # seeded
