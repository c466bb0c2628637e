"""Encoders: architectures, single-channel stems, pretrained weights from the hub cache (offline)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from training.encoders import (  # noqa: E402
    FUNDUS_ARCHS,
    OCT_ARCHS,
    Encoder,
    WeightsNotFoundError,
    build_backbone,
    hub_checkpoint_path,
)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def _place_pretrained(arch: str) -> dict:
    """Save a random state_dict of `arch` where torch hub keeps its weights file; return it."""
    factory, weights = {**FUNDUS_ARCHS, **OCT_ARCHS}[arch]
    torch.manual_seed(123)
    state = factory(weights=None).state_dict()
    path = hub_checkpoint_path(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("arch", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_oct_architectures_embed_single_channel_volumes(arch):
    torch.manual_seed(0)
    encoder = Encoder(arch, in_channels=1, embed_dim=12).eval()
    with torch.no_grad():
        out = encoder(torch.randn(2, 1, 4, 24, 24))
    assert out.shape == (2, 12)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert encoder.features(torch.randn(1, 1, 4, 24, 24)).shape == (1, 512)


def test_missing_pretrained_weights_name_the_expected_file(torch_home):
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone("r3d_18", 1, "kinetics")
    message = str(info.value)
    expected = torch_home / "hub" / "checkpoints" / "r3d_18-b3b3357e.pth"
    assert str(expected) in message and "https://download.pytorch.org/models/r3d_18-b3b3357e.pth" in message
    with pytest.raises(WeightsNotFoundError, match=r"resnet18-f37072fd\.pth"):
        build_backbone("resnet18", 3, "imagenet")


def test_imagenet_weights_load_and_gray_stem_sums_rgb_kernels(torch_home):
    state = _place_pretrained("resnet18")
    rgb, _ = build_backbone("resnet18", 3, "imagenet")
    gray, _ = build_backbone("resnet18", 1, "pretrained")
    torch.testing.assert_close(rgb.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    torch.testing.assert_close(gray.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    # A gray image through the summed stem == the same image repeated to RGB through the original.
    rgb.eval(), gray.eval()
    image = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray(image), rgb(image.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_kinetics_weights_load_into_single_channel_video_stem(torch_home):
    state = _place_pretrained("mc3_18")
    net, width = build_backbone("mc3_18", 1, "kinetics")
    assert width == 512
    torch.testing.assert_close(net.stem[0].weight, state["stem.0.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(net.layer3[0].conv1[0].weight, state["layer3.0.conv1.0.weight"])


def test_local_weights_file_with_model_key(tmp_path):
    torch.manual_seed(5)
    source, _ = build_backbone("resnet18", 3)
    path = tmp_path / "fundus.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)
    loaded, _ = build_backbone("resnet18", 3, str(path))
    torch.testing.assert_close(loaded.conv1.weight, source.conv1.weight)


def test_bad_init_values_are_explained(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not a weights file"):
        build_backbone("resnet18", 3, str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsNotFoundError, match="cannot load weights"):
        build_backbone("resnet18", 3, str(junk))
    with pytest.raises(ValueError, match="unknown architecture"):
        build_backbone("vit_b_16", 3)


@pytest.mark.parametrize("slices", [1, 2])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding"),
    [((3, 3, 3), (1, 1, 1), (1, 1, 1)), ((3, 3, 3), (2, 2, 2), (1, 1, 1)), ((1, 1, 1), (2, 2, 2), (0, 0, 0)),
     ((3, 1, 1), (1, 1, 1), (1, 0, 0))],
)
def test_few_slice_conv_matches_conv3d_values_and_gradients(slices, kernel, stride, padding):
    from training.encoders import FewSliceConv3d

    torch.manual_seed(0)
    plain = torch.nn.Conv3d(8, 6, kernel, stride=stride, padding=padding)
    fast = FewSliceConv3d(8, 6, kernel, stride=stride, padding=padding)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(3, 8, slices, 5, 5)
    outputs = []
    for conv in (plain, fast):
        xi = x.clone().requires_grad_(True)
        y = conv(xi)
        (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
        outputs.append((y.detach(), xi.grad, conv.weight.grad, conv.bias.grad))
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_oct_encoder_trains_its_few_slice_layers_as_2d_convolutions():
    """r3d_18 at 4 slices reaches two slices in layer 2 and one in layers 3-4: those convolutions run
    as conv2d while training (the fast path), and as the plain 3D convolution in evaluation (what
    ONNX export sees)."""
    from torch.profiler import profile

    from training.encoders import FewSliceConv3d

    encoder = Encoder("r3d_18", in_channels=1, embed_dim=8)
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(isinstance(m, FewSliceConv3d) for m in convs)
    x = torch.randn(2, 1, 4, 32, 32)

    def conv_ops(training: bool) -> set[str]:
        encoder.train(training)
        with profile() as prof, torch.set_grad_enabled(training):
            encoder(x)
        return {e.key for e in prof.key_averages() if e.key in ("aten::conv2d", "aten::conv3d")}

    assert conv_ops(training=True) == {"aten::conv2d", "aten::conv3d"}
    assert conv_ops(training=False) == {"aten::conv3d"}
