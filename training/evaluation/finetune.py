"""Fine-tuning: one encoder + one linear layer trained end to end per task and fold (torch).

Recipe (LP-FT, Kumar et al. 2022): the linear layer starts from the linear-probe head fitted on the same
training fold (so a few epochs refine a sensible solution instead of a random one), then SGD with
momentum 0.9 trains encoder and layer together, the encoder at a 100× lower learning rate. SGD rather
than Adam: Adam's first steps move every one of the encoder's millions of weights by ~lr whatever its
gradient, which wrecked the probe solution within one epoch in our tests; SGD's steps follow the
gradient's size. The layer works on embeddings standardised with the training fold's statistics (and,
for CST, a standardised target), so its weights are O(1) for every encoder. BatchNorm layers keep their
pre-trained statistics (eval mode): with batches of ~8 volumes, batch statistics are noise. Regression
loss is MSE on the CST scaled by the training fold's sd; binary tasks use class-balanced BCE, and the
decision threshold is Youden's J on the training fold's own predictions after fine-tuning.

Scope: ``full`` trains every encoder layer. ``top`` trains the last residual stage, the projection and
the layer, with the stages below frozen — their outputs are computed once per encoder and reused by
every fold and task, which makes fine-tuning ~4-8× cheaper on a CPU (a 3D ResNet step over a batch of
volumes costs seconds there). ``auto`` = ``full`` on a GPU, ``top`` on the CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.heads import youden_threshold
from training.model import batched_inference

SCOPES = ("auto", "full", "top")


@dataclass
class FinetuneSettings:
    epochs: int = 2
    scope: str = "full"  # resolved: "full" or "top"
    batch_size: int = 8
    head_lr: float = 1e-2
    encoder_lr: float = 1e-4
    weight_decay: float = 1e-4
    device: str = "cpu"


class _EncoderWithHead(nn.Module):
    """encoder -> L2 norm -> fixed standardisation (training-fold statistics) -> linear layer.

    The standardisation keeps the layer's weights O(1) even when the frozen embeddings barely vary
    (e.g. a randomly initialised encoder), so the layer's learning rate means the same for every
    encoder and a small encoder update cannot swing the prediction by hundreds of µm.
    """

    def __init__(self, encoder: nn.Module, weight, bias: float, mean: np.ndarray, scale: np.ndarray):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float32)))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, np.float32)))
        self.linear = nn.Linear(len(weight), 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(np.asarray(weight, np.float32))[None])
            self.linear.bias.fill_(float(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The encoders' embeddings are L2-normalised (contract 4); the probe heads were fitted on those.
        z = (F.normalize(self.encoder(x), dim=-1) - self.mean) / self.scale
        return self.linear(z).squeeze(-1)


def resolve_scope(scope: str, device: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"fine-tune scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if scope == "auto":
        return "top" if str(device).startswith("cpu") else "full"
    return scope


def split_encoder(encoder: nn.Module, scope: str) -> tuple[nn.Module | None, nn.Module]:
    """(frozen lower part or None, trainable upper part) with upper(lower(x)) == encoder(x) up to L2 norm.

    Works for torchvision ResNet (fundus) and VideoResNet (OCT) backbones behind a projection
    (training.encoders.Encoder); anything else is fine-tuned in full.
    """
    backbone = getattr(encoder, "backbone", None)
    projection = getattr(encoder, "projection", None)
    if scope == "full" or backbone is None or projection is None or not hasattr(backbone, "layer4"):
        return None, encoder
    if hasattr(backbone, "stem"):  # VideoResNet
        lower = [backbone.stem]
    else:  # ResNet
        lower = [backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool]
    frozen = nn.Sequential(*lower, backbone.layer1, backbone.layer2, backbone.layer3)
    upper = nn.Sequential(backbone.layer4, backbone.avgpool, nn.Flatten(1), projection)
    return frozen, upper


def frozen_features(frozen: nn.Module, x: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    """The frozen lower stages' output for every row (eval mode), computed once."""
    return batched_inference(frozen, x, batch_size, device)


def _freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _predict(net: nn.Module, x: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    return batched_inference(net, x, batch_size, device).astype(float)


def finetune_fold(
    encoder: nn.Module,
    kind: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    init_weight: np.ndarray,
    init_bias: float,
    train_embeddings: np.ndarray,
    settings: FinetuneSettings,
    seed: int,
) -> tuple[np.ndarray, float | None]:
    """Fine-tune a copy of `encoder` (or of the trainable part from `split_encoder`, fed the frozen part's
    outputs as `x_*`) with a linear layer that starts as the probe head (`init_weight`, `init_bias` on
    the frozen `train_embeddings`); return (test predictions in task units, threshold or None)."""
    torch.manual_seed(seed)
    y_train = np.asarray(y_train, np.float64)
    mean = train_embeddings.mean(axis=0)
    scale = np.maximum(train_embeddings.std(axis=0), 1e-6)
    # The probe head re-expressed on standardised embeddings (and, for CST, a standardised target).
    weight = np.asarray(init_weight, np.float64) * scale
    bias = float(init_bias) + float(np.asarray(init_weight, np.float64) @ mean)
    y_mean, y_scale = 0.0, 1.0
    if kind == "regression":
        y_mean, y_scale = float(y_train.mean()), float(y_train.std()) or 1.0
        weight, bias = weight / y_scale, (bias - y_mean) / y_scale
    net = _EncoderWithHead(copy.deepcopy(encoder), weight, bias, mean, scale).to(settings.device)
    for p in net.parameters():
        p.requires_grad_(True)
    optimiser = torch.optim.SGD(
        [
            {"params": net.encoder.parameters(), "lr": settings.encoder_lr},
            {"params": net.linear.parameters(), "lr": settings.head_lr},
        ],
        momentum=0.9,
        weight_decay=settings.weight_decay,
    )
    target = torch.as_tensor(((y_train - y_mean) / y_scale).astype(np.float32))
    if kind == "regression":
        loss_fn = F.mse_loss
    else:
        positives = float(target.sum())
        pos_weight = torch.tensor((len(target) - positives) / max(positives, 1.0), device=settings.device)
        loss_fn = lambda out, t: F.binary_cross_entropy_with_logits(out, t, pos_weight=pos_weight)  # noqa: E731
    order = torch.Generator().manual_seed(seed)
    for _ in range(settings.epochs):
        net.train()
        _freeze_batchnorm(net)
        permutation = torch.randperm(len(target), generator=order).numpy()
        for start in range(0, len(permutation), settings.batch_size):
            idx = np.sort(permutation[start : start + settings.batch_size])
            batch = torch.from_numpy(np.ascontiguousarray(x_train[idx])).to(settings.device)
            loss = loss_fn(net(batch), target[idx].to(settings.device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            optimiser.step()
    test_out = _predict(net, x_test, settings.batch_size, settings.device)
    if kind == "regression":
        return test_out * y_scale + y_mean, None
    train_prob = _sigmoid(_predict(net, x_train, settings.batch_size, settings.device))
    if len(np.unique(y_train)) < 2:
        return _sigmoid(test_out), 0.5
    return _sigmoid(test_out), youden_threshold(y_train, train_prob)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))
