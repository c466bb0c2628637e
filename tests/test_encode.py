"""``RetinaModel.encode`` / ``batched_inference``: the one batched torch inference loop."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training.config import resolve_config  # noqa: E402
from training.model import batched_inference, build_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(resolve_config("tiny", overrides={"fundus_channels": 1, "embed_dim": 16}))


def test_encode_matches_the_encoders_batch_by_batch_and_restores_the_mode(model):
    x = np.random.default_rng(0).normal(size=(5, 1, 4, 32, 32)).astype(np.float32)
    model.train()
    got = model.encode("oct", x, batch_size=2)
    assert model.training  # the caller's mode is restored
    model.eval()
    with torch.no_grad():
        expected = model.encode_oct(torch.from_numpy(x)).numpy()
    assert got.dtype == np.float32 and got.shape == (5, 16)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # torch input and float64 input give the same rows (cast to the model's dtype)
    np.testing.assert_allclose(model.encode("oct", torch.from_numpy(x), batch_size=4), got, atol=1e-5)
    np.testing.assert_allclose(model.encode("oct", x.astype(np.float64), batch_size=4), got, atol=1e-5)


def test_encode_empty_input_and_bad_arguments(model):
    empty = model.encode("fundus", np.zeros((0, 1, 32, 32), np.float32))
    assert empty.shape == (0, 16) and empty.dtype == np.float32
    with pytest.raises(ValueError, match="modality"):
        model.encode("retina", np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        model.encode("fundus", np.zeros((1, 1, 32, 32), np.float32), batch_size=0)


def test_batched_inference_of_any_module():
    net = torch.nn.Linear(3, 1)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = batched_inference(net, x, batch_size=3, forward=lambda b: net(b).squeeze(-1))
    with torch.no_grad():
        assert np.allclose(out, net(torch.from_numpy(x)).squeeze(-1).numpy())
    assert batched_inference(net, np.zeros((0, 3), np.float32), row_shape=(1,)).shape == (0, 1)


def test_batched_inference_restores_each_submodules_mode():
    bn = torch.nn.BatchNorm1d(3).eval()
    wrapper = torch.nn.Sequential(bn)  # a new container is in train mode, its child is not
    batched_inference(wrapper, np.ones((2, 3), np.float32))
    assert wrapper.training and not bn.training
