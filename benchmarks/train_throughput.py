"""Training-step throughput (pairs/s) of a preset on this machine: fp32 vs channels_last_3d vs bf16.

One full optimisation step = both encoders forward, loss, backward, gradient clipping, AdamW (fused,
as `retina train` uses it; "naive fp32" is the loop a user would write: torchvision's r3d_18 as
is, default AdamW, fp32, channels-first). `--profile` adds the step's FLOPs, the fp32 GEMM peak
of this machine (the floor) and where the step's time goes.
Settings are timed round-robin (one step of each in turn) and summarised by the median, so load
from other processes affects them alike. Random inputs of the preset's shapes.

    .venv/bin/python benchmarks/train_throughput.py --preset demo --threads 2 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch
from run import gemm_floor  # benchmarks/run.py: the same GEMM peak as the inference floor

from training.config import resolve_config
from training.encoders import FewSliceConv3d
from training.loop import autocast, make_optimizer, step_loss
from training.model import build_model

# name: (bf16 autocast, channels_last_3d, plain torchvision Conv3d, default AdamW instead of fused)
SETTINGS = {
    "naive fp32": (False, False, True, True),
    "fp32 (plain Conv3d)": (False, False, True, False),
    "fp32": (False, False, False, False),
    "fp32 + channels_last_3d": (False, True, False, False),
    "bf16 autocast": (True, False, False, False),
    "bf16 autocast + channels_last_3d": (True, True, False, False),
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        lines = [line for line in out.splitlines() if line.startswith("Model name")]
        return lines[0].split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        return platform.processor() or "unknown"


def step_profile(run, one_step) -> dict:
    """FLOPs of one fp32 step (torch's FlopCounterMode), the GEMM peak, and the top operators."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    if run is None:
        raise SystemExit("--profile needs the 'fp32' setting")
    counter = FlopCounterMode(display=False)
    with counter:
        one_step(*run)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(*run)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return {
        "gflop_per_step": round(counter.get_total_flops() / 1e9, 1),
        "gemm_peak_gflops": gemm_floor(torch.get_num_threads(), quick=False)["gflops"]["torch sgemm"],
        "top_ops_self_time_share": {e.key: round(e.self_cpu_time_total / total, 3) for e in events[:8]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--objective", default="clip")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--oct-size", type=int, default=None)
    parser.add_argument("--oct-slices", type=int, default=None)
    parser.add_argument("--fundus-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per setting (after 1 warm-up)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset")
    parser.add_argument("--profile", action="store_true", help="FLOPs, GEMM peak and op breakdown of 'fp32'")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    overrides = {
        "objective": args.objective,
        "batch_size": args.batch_size,
        "oct_size": args.oct_size,
        "oct_slices": args.oct_slices,
        "fundus_size": args.fundus_size,
    }
    config = resolve_config(args.preset, overrides=overrides)
    b = config.batch_size
    gen = torch.Generator().manual_seed(0)
    fundus = torch.randn(b, config.fundus_channels, config.fundus_size, config.fundus_size, generator=gen)
    oct = torch.randn(b, 1, config.oct_slices, config.oct_size, config.oct_size, generator=gen)

    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    runs = {}
    for name in names:
        bf16, channels_last, plain_convs, default_adamw = SETTINGS[name]
        torch.manual_seed(0)
        model = build_model(config)
        if channels_last:
            model.oct_encoder.to(memory_format=torch.channels_last_3d)
        if plain_convs:  # torchvision's Conv3d layers without the few-slice 2D path
            for module in model.oct_encoder.modules():
                if isinstance(module, FewSliceConv3d):
                    module.__class__ = torch.nn.Conv3d
        if default_adamw:
            optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        else:
            optimizer = make_optimizer(model, config)
        runs[name] = (model, optimizer, bf16, channels_last, [])

    def one_step(model, optimizer, bf16, channels_last):
        x = oct.contiguous(memory_format=torch.channels_last_3d) if channels_last else oct
        start = time.perf_counter()
        with autocast(bf16, torch.device("cpu")):
            loss = step_loss(model, fundus, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return time.perf_counter() - start

    for name in names:  # warm-up (allocations, oneDNN kernel selection)
        one_step(*runs[name][:4])
    for _ in range(args.rounds):
        for name in names:
            runs[name][4].append(one_step(*runs[name][:4]))

    profile = None
    if args.profile:
        profile = step_profile(runs["fp32"][:4] if "fp32" in runs else None, one_step)
    result = {
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "preset": config.preset,
        "shapes": {"batch": b, "oct": [1, config.oct_slices, config.oct_size, config.oct_size],
                   "fundus": [config.fundus_channels, config.fundus_size, config.fundus_size]},
        "settings": {
            name: {"median_s_per_step": round(statistics.median(t[4]), 3),
                   "pairs_per_s": round(b / statistics.median(t[4]), 2)}
            for name, t in runs.items()
        },
    }
    if "naive fp32" in runs:
        naive = statistics.median(runs["naive fp32"][4])
        for name, t in runs.items():
            result["settings"][name]["vs_naive"] = round(naive / statistics.median(t[4]), 2)
    if profile:
        step = result["settings"].get("fp32", {}).get("median_s_per_step")
        profile["floor_s_per_step"] = round(profile["gflop_per_step"] / profile["gemm_peak_gflops"], 3)
        if step:
            profile["share_of_peak"] = round(profile["floor_s_per_step"] / step, 2)
        result["profile"] = profile
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['machine']}, torch {result['torch']}, preset {config.preset}, shapes {result['shapes']}")
    for name, r in result["settings"].items():
        ratio = f"  {r['vs_naive']:.2f}x naive" if "vs_naive" in r else ""
        print(f"  {name:34s} {r['median_s_per_step']:7.3f} s/step  {r['pairs_per_s']:7.2f} pairs/s{ratio}")
    if profile:
        print(json.dumps(profile, indent=2))


if __name__ == "__main__":
    main()
