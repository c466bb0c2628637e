"""Training-step throughput (pairs/s) of a preset on this machine: fp32 vs channels_last_3d vs bf16.

One full optimisation step = both encoders forward, loss, backward, gradient clipping, fused AdamW.
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

from training.config import resolve_config
from training.loop import autocast, make_optimizer, step_loss
from training.model import build_model

SETTINGS = {
    "fp32": (False, False),
    "fp32 + channels_last_3d": (False, True),
    "bf16 autocast": (True, False),
    "bf16 autocast + channels_last_3d": (True, True),
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        lines = [line for line in out.splitlines() if line.startswith("Model name")]
        return lines[0].split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        return platform.processor() or "unknown"


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
        bf16, channels_last = SETTINGS[name]
        torch.manual_seed(0)
        model = build_model(config)
        if channels_last:
            model.oct_encoder.to(memory_format=torch.channels_last_3d)
        runs[name] = (model, make_optimizer(model, config), bf16, channels_last, [])

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
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['machine']}, torch {result['torch']}, preset {config.preset}, shapes {result['shapes']}")
    for name, r in result["settings"].items():
        print(f"  {name:34s} {r['median_s_per_step']:7.3f} s/step  {r['pairs_per_s']:7.2f} pairs/s")


if __name__ == "__main__":
    main()
