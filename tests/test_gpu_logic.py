"""The GPU decisions of training, checked on the CPU: float32 losses under autocast, the device and
process-group backend of each rank, bf16 only on capability >= 8, activation checkpointing (same
gradients, less kept memory) and export on the CPU."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from training import distributed  # noqa: E402
from training.config import resolve_config  # noqa: E402
from training.export import export_model  # noqa: E402
from training.loop import bf16_native, resolve_device, step_loss, use_bf16  # noqa: E402
from training.losses import clip_loss, cloob_loss, siglip_loss  # noqa: E402
from training.model import build_model, saved_activation_bytes  # noqa: E402

SMALL = {"oct_slices": 4, "oct_size": 32, "fundus_size": 32, "embed_dim": 16}


def _features(n=16, d=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=gen), dim=-1),
            F.normalize(torch.randn(n, d, generator=gen), dim=-1))


LOSSES = {
    # scale 100: the temperature clamp, where bf16 logits are coarsest
    "clip": lambda f, o: clip_loss(f, o, torch.tensor(100.0)),
    "siglip": lambda f, o: siglip_loss(f, o, torch.tensor(100.0), torch.tensor(-10.0)),
    "cloob": lambda f, o: cloob_loss(f, o, torch.tensor(14.3), 14.3),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_compute_in_float32_under_bf16_autocast(name):
    loss = LOSSES[name]
    f, o = _features()
    reference = loss(f, o)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # a bf16 matmul here would not give the fp32 value
        assert (f @ o.T).dtype == torch.bfloat16
        got = loss(f, o)
        from_bf16 = loss(f.bfloat16(), o.bfloat16())  # features as an autocast encoder returns them
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_bf16, loss(f.bfloat16().float(), o.bfloat16().float()), rtol=0, atol=1e-6)


def test_the_unprotected_clip_logits_differ_under_autocast():
    """Why the losses turn autocast off: the same formula under bf16 autocast gives another loss."""
    f, o = _features()
    target = torch.arange(len(f))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = 100.0 * f @ o.T
        naive = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    assert abs(float(naive) - float(clip_loss(f, o, torch.tensor(100.0)))) > 1e-3


def test_loss_gradients_are_float32_for_bf16_features():
    f, o = (t.bfloat16().requires_grad_() for t in _features())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clip_loss(f, o, torch.tensor(50.0)).backward()
    # the gradient is cast back to the input's dtype
    assert f.grad.dtype == torch.bfloat16 and torch.isfinite(f.grad.float()).all()


# --- devices and process groups -------------------------------------------------------------------


@pytest.mark.parametrize("name, local_rank, local_world, cuda, count, expected", [
    ("auto", 0, 1, False, 0, "cpu"),
    ("auto", 1, 2, False, 0, "cpu"),  # CPU ranks share the CPU
    ("auto", 0, 1, True, 1, "cuda:0"),
    ("auto", 3, 4, True, 4, "cuda:3"),  # torchrun on a 4-GPU node: one GPU per rank
    ("cuda", 1, 2, True, 2, "cuda:1"),
    ("cuda:1", 0, 1, True, 2, "cuda:1"),  # one process: the GPU it names
    ("cpu", 1, 2, True, 2, "cpu"),
])
def test_the_device_of_each_rank(name, local_rank, local_world, cuda, count, expected):
    device = distributed.device_for_rank(name, local_rank, local_world, cuda, count)
    assert device == torch.device(expected)


@pytest.mark.parametrize("name, local_rank, local_world, cuda, count, message", [
    ("cuda:0", 1, 2, True, 2, "puts all 2 processes of this machine on one GPU"),
    ("cuda", 0, 1, False, 0, "CUDA is not available"),
    ("cuda", 2, 4, True, 2, "cuda with LOCAL_RANK 2 needs GPU 2 but 2 GPU(s) are visible"),
    ("cuda:5", 0, 1, True, 2, "needs GPU 5"),
    ("gpu0", 0, 1, True, 1, "not a device"),
])
def test_impossible_devices_are_clear_errors(name, local_rank, local_world, cuda, count, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.device_for_rank(name, local_rank, local_world, cuda, count)


def test_the_backend_follows_the_resolved_device():
    # `auto` on a GPU machine resolves to cuda:N, which gets nccl (the --device string was "auto")
    assert distributed.backend_for(distributed.device_for_rank("auto", 1, 2, True, 2)) == "nccl"
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    here = "nccl" if torch.cuda.is_available() else "gloo"
    assert distributed.backend_for(resolve_device("auto")) == here


def test_one_process_makes_no_group_and_destroys_none(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    info = distributed.init_distributed(torch.device("cpu"))
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert not info.enabled and not info.owns_group
    assert info.device == torch.device("cpu")
    distributed.cleanup(info)
    assert not torch.distributed.is_initialized()


def test_launch_env_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.launch_env() == (3, 4)


# --- precision -------------------------------------------------------------------------------------


@pytest.mark.parametrize("capability, native", [
    (None, False), ((6, 0), False), ((7, 0), False), ((7, 5), False),  # P100, V100, T4: emulated
    ((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True), ((10, 0), True),
])
def test_bf16_only_on_compute_capability_8_and_up(capability, native):
    assert bf16_native(capability) is native


def test_precision_choice_on_the_cpu():
    cpu = torch.device("cpu")
    assert not use_bf16(resolve_config("tiny"), cpu)  # auto: fp32 on CPU
    assert use_bf16(resolve_config("tiny", overrides={"precision": "bf16"}), cpu)
    assert not use_bf16(resolve_config("tiny", overrides={"precision": "fp32"}), cpu)


# --- activation checkpointing ----------------------------------------------------------------------


def _pair(checkpointing: bool):
    torch.manual_seed(0)
    return build_model(resolve_config("tiny", overrides={**SMALL, "activation_checkpointing": checkpointing}))


def test_activation_checkpointing_gives_the_same_gradients_and_batchnorm_statistics():
    plain, checkpointed = _pair(False), _pair(True)
    checkpointed.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(1)
    fundus, oct = torch.randn(4, 3, 32, 32, generator=gen), torch.randn(4, 1, 4, 32, 32, generator=gen)
    losses = []
    for model in (plain, checkpointed):
        model.train()
        loss = step_loss(model, fundus, oct)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    grads = dict(checkpointed.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-5, atol=1e-5, msg=name)
    # the recomputation in the backward pass does not update the running statistics a second time
    buffers = dict(checkpointed.named_buffers())
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(buffers[name], buffer, rtol=0, atol=0, msg=name)
    assert int(buffers["oct_encoder.backbone.stem.1.num_batches_tracked"]) == 1


def test_activation_checkpointing_keeps_much_less_for_the_backward_pass():
    plain, checkpointed = _pair(False), _pair(True)
    x = torch.randn(2, 1, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    kept_plain = saved_activation_bytes(plain.oct_encoder, x)
    kept = saved_activation_bytes(checkpointed.oct_encoder, x)
    # stem: 64 x 8 x 32 x 32 float32 maps of 2 volumes = 2 MiB each; several per block are dropped
    assert kept_plain > 40 * 2**20
    assert kept < 0.5 * kept_plain
    # evaluation and export run the plain forward
    with torch.no_grad():
        torch.testing.assert_close(checkpointed.oct_encoder.eval()(x), plain.oct_encoder.eval()(x))


def test_activation_checkpointing_is_for_the_3d_encoder_only():
    from training.encoders import Encoder

    with pytest.raises(ValueError, match="3D encoders, not resnet18"):
        Encoder("resnet18", 3, 8, activation_checkpointing=True)
    with pytest.raises(ValueError, match="activation_checkpointing must be true or false"):
        resolve_config("tiny", overrides={"activation_checkpointing": "yes"})


# --- export -------------------------------------------------------------------------------------


def test_export_takes_a_float32_cpu_model_in_eval_mode():
    model = _pair(False).to(torch.bfloat16).train()
    exported = export_model(model)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in exported.parameters())
    assert all(b.device.type == "cpu" for b in exported.buffers())
    assert not any(m.training for m in exported.modules())
    out = exported.encode("fundus", torch.zeros(2, 3, 32, 32).numpy())
    assert out.dtype.name == "float32" and out.shape == (2, 16)
