"""Activation memory of the paper preset's encoders, with and without activation checkpointing, measured
on the CPU and extrapolated to a GPU batch (docs/training.md, "Memory").

    python benchmarks/activation_memory.py [--json out.json]

What is measured: the bytes autograd keeps for the backward pass of one training forward
(``training.model.saved_activation_bytes``: saved_tensors_hooks, each storage once, parameters and
the input batch not counted), at batch 1 and 2, in fp32 and under bf16 autocast. Two batch sizes
separate the per-pair bytes from the batch-independent ones (bf16 copies of the weights). The peak
is the larger of what the forward pass keeps and, with checkpointing, what is held while the
backward pass recomputes one segment (the stem, or one residual block of layer1): the inputs of
the segments not yet done plus that segment's activations, measured the same way. Gradients in
flight (a few feature maps) are not counted; the margin in ``fits`` covers them.

Extrapolated, not measured on a GPU: CUDA autocast's op lists differ slightly from the CPU's, and
the allocator, cuDNN workspaces and the CUDA context need room, hence the margin in ``fits``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from training.config import resolve_config
from training.model import build_model, saved_activation_bytes

GIB = 1024**3
GPUS_GIB = (24, 40, 80)
USABLE = 0.85  # share of the GPU's memory planned for (allocator fragmentation, workspaces)
RESERVED_GIB = 1.5  # CUDA context + cuDNN workspace


def linear_fit(encoder, make_input, bf16: bool) -> tuple[float, float]:
    """(fixed bytes, bytes per pair) from batch 1 and 2."""
    one = saved_activation_bytes(encoder, make_input(1), bf16)
    two = saved_activation_bytes(encoder, make_input(2), bf16)
    return 2 * one - two, two - one


def recompute_peak(encoder, make_input, bf16: bool) -> tuple[float, float]:
    """(fixed, per pair) of the most held while the backward pass recomputes a checkpointed segment.

    The backward pass reaches the stem and layer1 last: by then the later layers' activations are
    freed, and what is held is the inputs of the segments not yet done (kept by their checkpoints)
    plus the segment being recomputed. The worst segment gives the peak.
    """
    net = encoder.backbone
    segments = (net.stem, *net.layer1)
    held = {}
    for batch in (1, 2):
        x = make_input(batch)
        boundaries, worst = 0, 0
        for segment in segments:
            worst = max(worst, boundaries + saved_activation_bytes(segment, x, bf16))
            with torch.no_grad(), amp(bf16):
                x = segment(x)
            boundaries += x.untyped_storage().nbytes()  # this output is the next checkpoint's input
        held[batch] = worst
    return 2 * held[1] - held[2], held[2] - held[1]


def recompute_flop_share(config) -> float:
    """Share of the OCT encoder's forward FLOPs that checkpointing runs a second time (counted with
    FlopCounterMode on the meta device: no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder = build_model(config).oct_encoder.to("meta")
    x = torch.empty(1, 1, config.oct_slices, config.oct_size, config.oct_size, device="meta")
    with FlopCounterMode(display=False) as early:
        encoder.backbone.layer1(encoder.backbone.stem(x))
    with FlopCounterMode(display=False) as whole:
        encoder(x)
    return early.get_total_flops() / whole.get_total_flops()


def amp(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def peak(lines, batch: int) -> float:
    return max(fixed + batch * per_pair for fixed, per_pair in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the numbers to this file")
    parser.add_argument("--batch", type=int, default=64, help="global batch to extrapolate to (default 64)")
    args = parser.parse_args()

    config = resolve_config("paper", overrides={"fundus_init": "random", "oct_init": "random"})
    oct_shape = (1, config.oct_slices, config.oct_size, config.oct_size)
    fundus_shape = (config.fundus_channels, config.fundus_size, config.fundus_size)
    gen = torch.Generator().manual_seed(0)

    def oct_input(batch):
        return torch.randn(batch, *oct_shape, generator=gen)

    def fundus_input(batch):
        return torch.randn(batch, *fundus_shape, generator=gen)

    share = recompute_flop_share(config)
    print(f"checkpointing recomputes {share:.0%} of the OCT forward FLOPs: about {share / 3:.0%} more OCT "
          "training FLOPs (a step is about 3 forward passes)", flush=True)
    torch.manual_seed(0)
    plain = build_model(config)
    checkpointed = build_model(resolve_config("paper", overrides={
        "fundus_init": "random", "oct_init": "random", "activation_checkpointing": True}))
    n_params = sum(p.numel() for p in plain.parameters())
    states = 16 * n_params  # fp32 weights + gradients + AdamW's two moments
    rows = {}
    started = time.perf_counter()
    for precision in ("fp32", "bf16"):
        bf16 = precision == "bf16"
        fundus = linear_fit(plain.fundus_encoder, fundus_input, bf16)
        for checkpointing in (False, True):
            model = checkpointed if checkpointing else plain
            kept = linear_fit(model.oct_encoder, oct_input, bf16)
            recompute = recompute_peak(model.oct_encoder, oct_input, bf16) if checkpointing else (0.0, 0.0)
            # the fundus activations are held until the fundus backward, which may come last
            lines = [(kept[0] + fundus[0], kept[1] + fundus[1]),
                     (recompute[0] + fundus[0], recompute[1] + fundus[1])]
            row = {
                "precision": precision,
                "activation_checkpointing": checkpointing,
                "fundus_per_pair": fundus[1],
                "oct_kept_per_pair": kept[1],
                "oct_recompute_peak_per_pair": recompute[1],
                "peak_lines": lines,
                f"peak_batch_{args.batch}_gib": peak(lines, args.batch) / GIB,
            }
            rows[(precision, checkpointing)] = row
            print(f"{precision} checkpointing={checkpointing}: OCT kept {kept[1] / 2**20:.0f} MiB per pair "
                  f"(+{kept[0] / 2**20:.0f} fixed), peak while recomputing {recompute[1] / 2**20:.0f}; "
                  f"fundus {fundus[1] / 2**20:.0f}; batch {args.batch}: peak activations "
                  f"{row[f'peak_batch_{args.batch}_gib']:.1f} GiB", flush=True)
    print(f"model {n_params / 1e6:.1f} M parameters: weights + grads + AdamW states {states / GIB:.2f} GiB; "
          f"measured in {time.perf_counter() - started:.0f} s")

    print("\n| GPU | fp32 | fp32 + checkpointing | bf16 | bf16 + checkpointing |\n|---|---|---|---|---|")
    for gib in GPUS_GIB:
        budget = USABLE * gib * GIB - RESERVED_GIB * GIB - states
        cells = []
        for key in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)):
            row = rows[key]
            lines = [(fixed, per_pair) for fixed, per_pair in row["peak_lines"] if per_pair > 0]
            fits = max(0, min(int((budget - fixed) // per_pair) for fixed, per_pair in lines))
            row.setdefault("max_batch_per_gpu", {})[gib] = fits
            cells.append(str(fits))
        print(f"| {gib} GB | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"parameters": n_params, "states_bytes": states, "usable": USABLE,
                       "reserved_gib": RESERVED_GIB, "rows": list(rows.values())}, handle, indent=2)


if __name__ == "__main__":
    main()
