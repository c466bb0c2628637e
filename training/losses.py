"""Contrastive objectives on paired, L2-normalised features (row i of `fundus` pairs with row i of `oct`).

- ``clip_loss``: InfoNCE, the mean of the fundus->OCT and OCT->fundus cross-entropies over
  ``logit_scale * fundus @ oct.T`` (open_clip convention; `logit_scale` is the value, not its log).
- ``cloob_loss``: CLOOB (Fürst et al. 2022) as in the ml-jku/cloob reference: each modality is
  retrieved from the in-batch Hopfield memories of both modalities, and InfoLOOB (the positive left
  out of the denominator) is applied to the retrievals, scaled by tau = 1 / inv_tau.
- ``siglip_loss``: the pairwise sigmoid loss (Zhai et al. 2023), summed over pairs, divided by B.

All of them compute in float32 even when called under autocast (autocast is switched off inside and
the inputs are cast up), so no caller can get it wrong: the logits are small matrices, and bf16 there
would round logits near the temperature clamp (scale 100) to steps of about 0.5, for no speed gain.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _f32(value):
    # float64 stays float64 (reference checks); half precisions go up
    low = isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16)
    return value.float() if low else value


def float32(loss):
    """Run `loss` with autocast off on the inputs' device and its fp16/bf16 tensor arguments in float32.

    Casting the inputs alone is not enough: autocast re-casts the matmuls inside to bf16/fp16.
    """

    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        device_type = first.device.type if first is not None else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return loss(*(_f32(a) for a in args), **{k: _f32(v) for k, v in kwargs.items()})

    return wrapper


@float32
def clip_loss(fundus: torch.Tensor, oct: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: 0.5 * (CE(rows of logits) + CE(columns of logits)), logits = s * F Oᵀ."""
    logits = logit_scale * fundus @ oct.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@float32
def hopfield_retrieval(queries: torch.Tensor, memory: torch.Tensor, beta: float) -> torch.Tensor:
    """Modern Hopfield retrieval of each query row from the memory rows, re-normalised to unit length."""
    attention = torch.softmax(beta * queries @ memory.T, dim=-1)
    return F.normalize(attention @ memory, dim=-1)


@float32
def info_loob(x: torch.Tensor, y: torch.Tensor, inv_tau: torch.Tensor | float) -> torch.Tensor:
    """InfoLOOB of rows `x` against columns `y` (positive = same index, left out of the denominator):
    tau * (-mean_i k_ii + mean_i log sum_{j != i} exp k_ij), with k = inv_tau * x yᵀ."""
    k = inv_tau * x @ y.T
    eye = torch.eye(k.shape[0], dtype=torch.bool, device=k.device)
    positives = k.diagonal().mean()
    negatives = torch.logsumexp(k.masked_fill(eye, float("-inf")), dim=1).mean()
    return (negatives - positives) / inv_tau


@float32
def cloob_loss(
    fundus: torch.Tensor,
    oct: torch.Tensor,
    inv_tau: torch.Tensor | float,
    scale_hopfield: torch.Tensor | float,
) -> torch.Tensor:
    """CLOOB: InfoLOOB(U_x, U_y) + InfoLOOB(V_y, V_x).

    U_* are retrieved from the fundus memory (U_x: fundus queries, U_y: OCT queries), V_* from the
    OCT memory (V_x: fundus queries, V_y: OCT queries).
    """
    if fundus.shape[0] < 2:
        raise ValueError("cloob_loss needs at least 2 pairs (InfoLOOB leaves the positive out)")
    u_x = hopfield_retrieval(fundus, fundus, scale_hopfield)
    u_y = hopfield_retrieval(oct, fundus, scale_hopfield)
    v_x = hopfield_retrieval(fundus, oct, scale_hopfield)
    v_y = hopfield_retrieval(oct, oct, scale_hopfield)
    return info_loob(u_x, u_y, inv_tau) + info_loob(v_y, v_x, inv_tau)


@float32
def siglip_loss(
    fundus: torch.Tensor,
    oct: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """Sigmoid loss: -sum_ij log sigmoid(z_ij (s f_i·o_j + b)) / B; z = +1 on the diagonal, else -1."""
    logits = logit_scale * fundus @ oct.T + logit_bias
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
