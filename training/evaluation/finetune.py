"""Fine-tuning: one encoder + one linear layer trained end to end per task and fold (torch, CPU-cheap).

Recipe (LP-FT, Kumar et al. 2022): the linear layer starts from the linear-probe head fitted on the same
training fold (so a few epochs refine a sensible solution instead of a random one), then AdamW trains
encoder and layer together with a 10× lower learning rate for the encoder. BatchNorm layers keep their
pre-trained statistics (eval mode): with batches of ~8 volumes, batch statistics are noise. Regression
loss is MSE on the CST scaled by the training fold's sd; binary tasks use class-balanced BCE, and the
decision threshold is Youden's J on the training fold's own predictions after fine-tuning.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.evaluation.metrics import youden_threshold


@dataclass
class FinetuneSettings:
    epochs: int = 2
    batch_size: int = 8
    head_lr: float = 1e-3
    encoder_lr: float = 1e-4
    weight_decay: float = 1e-4
    device: str = "cpu"


class _EncoderWithHead(nn.Module):
    def __init__(self, encoder: nn.Module, weight: np.ndarray, bias: float):
        super().__init__()
        self.encoder = encoder
        self.linear = nn.Linear(len(weight), 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(np.asarray(weight, np.float32))[None])
            self.linear.bias.fill_(float(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The encoders' embeddings are L2-normalised (contract 4); the probe heads were fitted on those.
        return self.linear(F.normalize(self.encoder(x), dim=-1)).squeeze(-1)


def _freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _predict(net: nn.Module, x: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    net.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])).to(device)
            outs.append(net(batch).float().cpu().numpy())
    return np.concatenate(outs).astype(float) if outs else np.zeros(0)


def finetune_fold(
    encoder: nn.Module,
    kind: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    init_weight: np.ndarray,
    init_bias: float,
    settings: FinetuneSettings,
    seed: int,
) -> tuple[np.ndarray, float | None]:
    """Fine-tune a copy of `encoder`; return (test predictions in task units, threshold or None)."""
    torch.manual_seed(seed)
    net = _EncoderWithHead(copy.deepcopy(encoder), init_weight, init_bias).to(settings.device)
    for p in net.parameters():
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(
        [
            {"params": net.encoder.parameters(), "lr": settings.encoder_lr},
            {"params": net.linear.parameters(), "lr": settings.head_lr},
        ],
        weight_decay=settings.weight_decay,
    )
    y = torch.as_tensor(np.asarray(y_train, np.float32))
    if kind == "regression":
        scale = float(np.std(y_train)) or 1.0
        loss_fn = lambda out, target: torch.mean(((out - target) / scale) ** 2)  # noqa: E731
    else:
        positives = float(y.sum())
        pos_weight = torch.tensor((len(y) - positives) / max(positives, 1.0))
        loss_fn = lambda out, target: F.binary_cross_entropy_with_logits(  # noqa: E731
            out, target, pos_weight=pos_weight.to(out.device)
        )
    order = torch.Generator().manual_seed(seed)
    for _ in range(settings.epochs):
        net.train()
        _freeze_batchnorm(net)
        permutation = torch.randperm(len(y), generator=order).numpy()
        for start in range(0, len(permutation), settings.batch_size):
            idx = np.sort(permutation[start : start + settings.batch_size])
            batch = torch.from_numpy(np.ascontiguousarray(x_train[idx])).to(settings.device)
            loss = loss_fn(net(batch), y[idx].to(settings.device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            optimiser.step()
    test_out = _predict(net, x_test, settings.batch_size, settings.device)
    if kind == "regression":
        return test_out, None
    train_prob = _sigmoid(_predict(net, x_train, settings.batch_size, settings.device))
    return _sigmoid(test_out), youden_threshold(y_train, train_prob)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))
