"""Image encoders: a torchvision backbone plus a linear projection to the shared, L2-normalised space.

Fundus: 2D ``resnet18``. OCT: 3D ``r3d_18`` (VideoResNet18), or ``mc3_18`` / ``r2plus1d_18``.

Initialisation (``init``):
- ``"random"``: torchvision's default initialisation.
- ``"imagenet"`` (2D) / ``"kinetics"`` (3D) / ``"pretrained"`` (either): the torchvision weights,
  read from the torch hub checkpoint folder (``$TORCH_HOME/hub/checkpoints/<file>``). Nothing is
  downloaded at run time; a missing file is a clear error naming the path and the URL.
- a path to a local ``.pt``/``.pth`` file holding a state_dict (or a dict with a ``"model"`` /
  ``"state_dict"`` key), loaded with ``torch.load(weights_only=True)``.

Activation checkpointing (``activation_checkpointing=True``, 3D encoders only): the stem and the
first residual stage, which at the paper preset's 20 x 224² volumes hold most of the activation
memory (full-resolution feature maps with 64 channels), are recomputed in the backward pass instead
of keeping their activations; gradients are the same and BatchNorm running statistics are updated
once per step as without it (docs/training.md, "Memory").

Single-channel inputs (OCT, NIR/SLO fundus): the stem convolution gets one input channel. With
pretrained weights its kernel is the sum of the RGB kernels over the channel axis, which gives the
same response to a gray image repeated three times, without tripling the input.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.models.video import (
    MC3_18_Weights,
    R2Plus1D_18_Weights,
    R3D_18_Weights,
    mc3_18,
    r2plus1d_18,
    r3d_18,
)
from torchvision.models.video.resnet import VideoResNet

from retinacli.errors import EXIT_USAGE, RetinaError

FUNDUS_ARCHS = {"resnet18": (resnet18, ResNet18_Weights.IMAGENET1K_V1)}
OCT_ARCHS = {
    "r3d_18": (r3d_18, R3D_18_Weights.KINETICS400_V1),
    "mc3_18": (mc3_18, MC3_18_Weights.KINETICS400_V1),
    "r2plus1d_18": (r2plus1d_18, R2Plus1D_18_Weights.KINETICS400_V1),
}
PRETRAINED_NAMES = {"resnet18": ("imagenet", "pretrained"), "3d": ("kinetics", "pretrained")}


class WeightsNotFoundError(RetinaError):
    """Pretrained weights were asked for but are not on disk (nothing is downloaded at run time)."""


def hub_checkpoint_path(weights) -> Path:
    """Where torch hub keeps (and where we look for) a torchvision weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (a state_dict, or a dict holding one under ``model`` /
    ``state_dict``, as in a checkpoint); an unreadable or foreign file is a WeightsNotFoundError."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, not a torch file, or pickled code
        raise WeightsNotFoundError(f"{path}: cannot load weights ({exc.__class__.__name__}: {exc})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsNotFoundError(f"{path}: not a state_dict of tensors")
    return obj


def check_init(arch: str, init: str) -> None:
    """Raise the WeightsNotFoundError `pretrained_state_dict` would, without loading any weights, so
    a missing file is reported before any work starts."""
    if init == "random" or (arch not in FUNDUS_ARCHS and arch not in OCT_ARCHS):
        return  # an unknown arch is reported where the model is built
    table = FUNDUS_ARCHS if arch in FUNDUS_ARCHS else OCT_ARCHS
    _, weights = table[arch]
    known = PRETRAINED_NAMES["resnet18" if arch in FUNDUS_ARCHS else "3d"]
    if init in known:
        path = hub_checkpoint_path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"{arch} {init} weights not found at {path} (no download at run time): "
                f"fetch {weights.url} to that path, or set TORCH_HOME, or pass a local weights file",
                exit_code=EXIT_USAGE,
            )
    elif not Path(init).expanduser().is_file():
        raise WeightsNotFoundError(
            f"{init}: not a weights file and not one of random, {', '.join(known)} for {arch}",
            exit_code=EXIT_USAGE,
        )


def pretrained_state_dict(arch: str, init: str) -> dict[str, torch.Tensor] | None:
    """The state_dict `init` names for `arch` (None for random), or a clear WeightsNotFoundError."""
    if init == "random":
        return None
    check_init(arch, init)
    table = FUNDUS_ARCHS if arch in FUNDUS_ARCHS else OCT_ARCHS
    _, weights = table[arch]
    known = PRETRAINED_NAMES["resnet18" if arch in FUNDUS_ARCHS else "3d"]
    return read_state_dict(hub_checkpoint_path(weights) if init in known else Path(init).expanduser())


def _adapt_stem(conv: nn.Conv2d | nn.Conv3d, in_channels: int, pretrained: bool) -> nn.Module:
    """A copy of `conv` taking `in_channels`; pretrained RGB kernels are summed over the channel axis."""
    if conv.in_channels == in_channels:
        return conv
    new = type(conv)(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        if pretrained and in_channels == 1:
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        else:  # torchvision's own conv init for these nets
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def build_backbone(arch: str, in_channels: int, init: str = "random") -> tuple[nn.Module, int]:
    """(backbone without its classifier, feature width)."""
    if arch in FUNDUS_ARCHS:
        factory, _ = FUNDUS_ARCHS[arch]
    elif arch in OCT_ARCHS:
        factory, _ = OCT_ARCHS[arch]
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(FUNDUS_ARCHS | OCT_ARCHS)}")
    net = factory(weights=None)
    state = pretrained_state_dict(arch, init)
    if state is not None:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsNotFoundError(
                f"{init}: weights do not match {arch} (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    width = net.fc.in_features
    net.fc = nn.Identity()
    if arch in FUNDUS_ARCHS:
        net.conv1 = _adapt_stem(net.conv1, in_channels, pretrained=state is not None)
    else:
        net.stem[0] = _adapt_stem(net.stem[0], in_channels, pretrained=state is not None)
        _use_few_slice_convs(net)
    return net, width


class FewSliceConv3d(nn.Conv3d):
    """A Conv3d that trains as 2D convolutions, one per temporal tap, when its input has 1-2 slices.

    Output slice t is the sum over taps k of the 2D convolution of input slice t*stride - pad + k
    with the kernel's slice k, over the taps that meet data; taps that meet only zero padding are
    skipped (they get zero gradient either way). At the demo preset's 4 slices r3d_18's layer 2 sees
    2 slices and layers 3-4 see one, where oneDNN's 3D backward is slow: forward + backward of the
    512-channel convolution at 16x512x1x2x2 takes 126 ms as Conv3d and 31 ms as conv2d, the
    128-channel one at 16x128x2x8x8 53 vs 33 ms; at 4 slices the 3D kernel wins, so it stays
    (benchmarks/RESULTS.md). Only on CPU while training, where it was measured; evaluation and ONNX
    export run the plain 3D convolution.
    """

    MAX_SLICES = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and x.device.type == "cpu" and self._by_taps(x):
            return self._forward_by_taps(x)
        return super().forward(x)

    def _by_taps(self, x: torch.Tensor) -> bool:
        if x.shape[2] > self.MAX_SLICES or isinstance(self.padding, str) or self.padding_mode != "zeros":
            return False
        return self.dilation[0] == 1 and self.groups == 1

    def _forward_by_taps(self, x: torch.Tensor) -> torch.Tensor:
        n, slices = x.shape[0], x.shape[2]
        kt, pt, st = self.kernel_size[0], self.padding[0], self.stride[0]
        out_slices = (slices + 2 * pt - kt) // st + 1
        outputs: list[torch.Tensor | None] = [None] * out_slices
        for k in range(kt):
            pairs = [(t, t * st - pt + k) for t in range(out_slices) if 0 <= t * st - pt + k < slices]
            if not pairs:
                continue
            # every (output, input) slice pair of this tap in one conv2d call, stacked on the batch
            inputs = torch.cat([x[:, :, i] for _, i in pairs]) if len(pairs) > 1 else x[:, :, pairs[0][1]]
            y = F.conv2d(inputs, self.weight[:, :, k], None, self.stride[1:], self.padding[1:],
                         self.dilation[1:])
            for j, (t, _) in enumerate(pairs):
                part = y[j * n : (j + 1) * n]
                outputs[t] = part if outputs[t] is None else outputs[t] + part
        y = torch.stack(outputs, dim=2)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1, 1)


def _use_few_slice_convs(net: nn.Module) -> None:
    # torchvision's video nets use plain Conv3d subclasses (Conv3DSimple, ...) that only add
    # construction helpers; after construction the swap keeps parameters and state_dict keys.
    for module in net.modules():
        if isinstance(module, nn.Conv3d):
            module.__class__ = FewSliceConv3d


@contextlib.contextmanager
def _buffers_kept(module: nn.Module):
    """Restore `module`'s buffers on exit: the recomputation of a checkpointed segment must not update
    BatchNorm running statistics a second time."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _recompute_context(segment: nn.Module):
    return lambda: (contextlib.nullcontext(), _buffers_kept(segment))


class Encoder(nn.Module):
    """Backbone -> linear projection -> L2 normalisation. Usable on its own (e.g. for ONNX export)."""

    def __init__(
        self,
        arch: str,
        in_channels: int,
        embed_dim: int,
        init: str = "random",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.arch = arch
        self.in_channels = in_channels
        self.backbone, self.feature_dim = build_backbone(arch, in_channels, init)
        self.projection = nn.Linear(self.feature_dim, embed_dim)
        self.embed_dim = embed_dim
        if activation_checkpointing and not isinstance(self.backbone, VideoResNet):
            raise ValueError(f"activation checkpointing is for the 3D encoders, not {arch}")
        self.activation_checkpointing = activation_checkpointing

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features before the projection, (B, feature_dim)."""
        if not (self.activation_checkpointing and self.training and torch.is_grad_enabled()):
            return self.backbone(x)
        net = self.backbone
        # One segment per block (stem, each residual block of layer1): the backward pass recomputes
        # one block at a time, so the peak holds one block's activations, not the whole first stage's.
        for segment in (net.stem, *net.layer1):
            x = checkpoint(segment, x, use_reentrant=False, context_fn=_recompute_context(segment))
        # the rest of torchvision's VideoResNet.forward
        x = net.avgpool(net.layer4(net.layer3(net.layer2(x))))
        return net.fc(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.features(x)), dim=-1)
