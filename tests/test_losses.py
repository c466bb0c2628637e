"""Objectives against independent float64 numpy references written with explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.losses import clip_loss, cloob_loss, info_loob, siglip_loss  # noqa: E402


def _unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _logsumexp(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def ref_clip(f, o, scale):
    n = len(f)
    logits = [[scale * float(np.dot(f[i], o[j])) for j in range(n)] for i in range(n)]
    rows = sum(_logsumexp(logits[i]) - logits[i][i] for i in range(n)) / n
    cols = sum(_logsumexp([logits[j][i] for j in range(n)]) - logits[i][i] for i in range(n)) / n
    return 0.5 * (rows + cols)


def ref_retrieve(queries, memory, beta):
    out = []
    for q in queries:
        scores = [beta * float(np.dot(q, m)) for m in memory]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        r = sum((w / total) * m for w, m in zip(weights, memory, strict=True))
        out.append(r / math.sqrt(float(np.dot(r, r))))
    return out


def ref_info_loob(x, y, inv_tau):
    n, tau = len(x), 1.0 / inv_tau
    pos = sum(inv_tau * float(np.dot(x[i], y[i])) for i in range(n)) / n
    neg = 0.0
    for i in range(n):
        neg += _logsumexp([inv_tau * float(np.dot(x[i], y[j])) for j in range(n) if j != i]) / n
    return tau * (-pos + neg)


def ref_cloob(f, o, inv_tau, beta):
    u_x, u_y = ref_retrieve(f, f, beta), ref_retrieve(o, f, beta)
    v_x, v_y = ref_retrieve(f, o, beta), ref_retrieve(o, o, beta)
    return ref_info_loob(u_x, u_y, inv_tau) + ref_info_loob(v_y, v_x, inv_tau)


def ref_siglip(f, o, scale, bias):
    n = len(f)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * float(np.dot(f[i], o[j])) + bias
            total += math.log1p(math.exp(-z * logit))  # -log sigmoid(z * logit)
    return total / n


@pytest.fixture
def pair():
    rng = np.random.default_rng(7)
    return _unit_rows(rng, 6, 5), _unit_rows(rng, 6, 5)


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


@pytest.mark.parametrize("scale", [1 / 0.07, 3.0, 100.0])
def test_clip_loss_matches_reference(pair, scale):
    f, o = pair
    assert clip_loss(_t(f), _t(o), scale).item() == pytest.approx(ref_clip(f, o, scale), abs=1e-6)


@pytest.mark.parametrize(("inv_tau", "beta"), [(14.3, 14.3), (1.0, 8.0), (30.0, 2.0)])
def test_cloob_loss_matches_reference(pair, inv_tau, beta):
    f, o = pair
    got = cloob_loss(_t(f), _t(o), inv_tau, beta).item()
    assert got == pytest.approx(ref_cloob(f, o, inv_tau, beta), abs=1e-6)


def test_info_loob_leaves_positive_out_and_scales_by_tau():
    rng = np.random.default_rng(3)
    x, y = _unit_rows(rng, 5, 4), _unit_rows(rng, 5, 4)
    for inv_tau in (1.0, 14.3):
        got = info_loob(_t(x), _t(y), inv_tau).item()
        assert got == pytest.approx(ref_info_loob(x, y, inv_tau), abs=1e-6)
    # An InfoNCE-style denominator (positive included) differs clearly once positives are aligned.
    y = x + 0.1 * y
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    assert info_loob(_t(x), _t(y), 14.3).item() == pytest.approx(ref_info_loob(x, y, 14.3), abs=1e-6)
    k = 14.3 * x @ y.T
    with_positive = sum(_logsumexp(list(k[i])) - k[i, i] for i in range(5)) / 5 / 14.3
    assert abs(info_loob(_t(x), _t(y), 14.3).item() - with_positive) > 0.05


def test_cloob_is_insensitive_to_positive_in_denominator():
    # With a two-pair batch, the only negative is the other pair: perfect alignment of positives
    # still leaves a loss determined by the negatives alone (no log(1 + ...) floor as in InfoNCE).
    f = np.array([[1.0, 0.0], [0.0, 1.0]])
    x = ref_info_loob(list(f), list(f), 10.0)
    assert x == pytest.approx(0.1 * (-10.0 + 0.0), abs=1e-12)
    assert info_loob(_t(f), _t(f), 10.0).item() == pytest.approx(x, abs=1e-12)


@pytest.mark.parametrize(("scale", "bias"), [(10.0, -10.0), (1.0, 0.0)])
def test_siglip_loss_matches_reference(pair, scale, bias):
    f, o = pair
    got = siglip_loss(_t(f), _t(o), scale, bias).item()
    assert got == pytest.approx(ref_siglip(f, o, scale, bias), abs=1e-6)


def test_losses_compute_in_float32_under_bfloat16_inputs(pair):
    f, o = pair
    got = clip_loss(_t(f).bfloat16(), _t(o).bfloat16(), 10.0)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("objective", ["clip", "cloob", "siglip"])
def test_gradients_flow_through_both_encoders_and_temperature(objective):
    from training.config import resolve_config
    from training.model import build_model
    from training.objective import compute_loss

    torch.manual_seed(0)
    config = resolve_config("tiny", overrides={"objective": objective, "learn_inv_tau": True})
    model = build_model(config)
    fundus, oct = torch.randn(3, 3, 32, 32), torch.randn(3, 1, 4, 32, 32)
    loss = compute_loss(model, *model(fundus, oct))
    loss.backward()
    for name in ("fundus_encoder", "oct_encoder"):
        encoder = getattr(model, name)
        assert encoder.projection.weight.grad.abs().sum() > 0
        stem = next(p for p in encoder.backbone.parameters())
        assert stem.grad is not None and stem.grad.abs().sum() > 0
    temperature = model.log_inv_tau if objective == "cloob" else model.logit_scale
    assert temperature.grad is not None and temperature.grad != 0
