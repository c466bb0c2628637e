"""GPU smoke test of `retina train`'s GPU paths (issue 20), for a machine with one CUDA GPU.

1. Paper-preset training steps (OCT 1x20x224x224, fundus 224 px, global batch 64, random init, CLIP
   and CLOOB) on synthetic arrays: pairs/s and peak GPU memory in fp32, bf16 autocast, and bf16 +
   activation checkpointing, next to docs/training.md's CPU-measured extrapolation of the activation peak.
   One step = the loop's own pieces (step_loss under the loop's autocast, clip, fused AdamW).
2. NCCL: a one-process group made the way `init_distributed` makes it (set_device first, backend from
   `backend_for`, `device_id` passed), an all-reduce and the loss's differentiable feature gather.
3. Export of a GPU-trained model: a few tiny-preset steps in bf16 on the GPU, `export_model` (back to
   fp32 on the CPU), the dynamo ONNX export, and onnxruntime (CPU) parity against torch on the GPU and CPU.

    PYTHONPATH=. python3 benchmarks/gpu_smoke.py --json-out gpu_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from training.config import resolve_config
from training.distributed import backend_for, gather_features
from training.export.package import export_model
from training.loop import autocast, bf16_native, make_optimizer, step_loss
from training.model import build_model

GIB = 1024**3
# docs/training.md "Memory": activation peak at batch 64, measured on a CPU and extrapolated (GiB).
CPU_EXTRAPOLATED_PEAK_GIB = {"fp32": 51.0, "bf16": 25.8, "bf16 + checkpointing": 12.2,
                             "fp32 + checkpointing": 24.3}


def train_steps(objective: str, mode: str, steps: int, device: torch.device) -> dict:
    """Median pairs/s over `steps` timed steps (after 2 warm-ups) and the peak memory of a step."""
    bf16 = mode.startswith("bf16")
    config = resolve_config("paper", overrides={
        "objective": objective, "fundus_init": "random", "oct_init": "random",
        "activation_checkpointing": "checkpointing" in mode})
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = make_optimizer(model, config)
    gen = torch.Generator(device=device).manual_seed(0)
    b = config.batch_size
    fundus = torch.randn(b, config.fundus_channels, config.fundus_size, config.fundus_size,
                         generator=gen, device=device)
    oct = torch.randn(b, 1, config.oct_slices, config.oct_size, config.oct_size, generator=gen, device=device)
    weights_bytes = torch.cuda.memory_allocated(device)

    def step() -> float:
        with autocast(bf16, device):
            loss = step_loss(model, fundus, oct)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())

    for _ in range(2):
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())  # float() synchronises: each step is timed whole
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device)  # the caller empties the cache once these are freed
    median = float(np.median(times))
    return {
        "batch": b, "pairs_per_s": round(b / median, 1), "median_s_per_step": round(median, 4),
        "peak_gib": round(peak / GIB, 2), "inputs_weights_gib": round(weights_bytes / GIB, 2),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "loss_finite": bool(np.all(np.isfinite(losses))),
        "cpu_extrapolated_activation_peak_gib": CPU_EXTRAPOLATED_PEAK_GIB.get(mode),
    }


def nccl_one_process(device: torch.device) -> dict:
    import torch.distributed as dist

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.cuda.set_device(device)
    backend = backend_for(device)
    dist.init_process_group(backend=backend, device_id=device)
    try:
        x = torch.arange(4, dtype=torch.float32, device=device)
        dist.all_reduce(x)
        local = torch.randn(8, 16, device=device, requires_grad=True)
        gathered = gather_features(local)
        gathered.sum().backward()
        return {"backend": backend, "group_backend": dist.get_backend(), "world_size": dist.get_world_size(),
                "all_reduce_ok": bool(torch.equal(x.cpu(), torch.arange(4, dtype=torch.float32))),
                "gather_shape": list(gathered.shape),
                "gather_grad_ok": bool(torch.all(local.grad == 1).item())}
    finally:
        dist.destroy_process_group()


def export_parity(device: torch.device) -> dict:
    from training.export.graphs import export_encoder
    from training.export.parity import encoder_parity

    config = resolve_config("tiny", overrides={"objective": "clip"})
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = make_optimizer(model, config)
    rng = np.random.default_rng(0)
    fundus = torch.from_numpy(rng.standard_normal(
        (8, config.fundus_channels, config.fundus_size, config.fundus_size), dtype=np.float32)).to(device)
    oct = torch.from_numpy(rng.standard_normal(
        (8, 1, config.oct_slices, config.oct_size, config.oct_size), dtype=np.float32)).to(device)
    model.train()
    for _ in range(5):
        with autocast(True, device):
            loss = step_loss(model, fundus, oct)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    on_gpu = {m: model.encode(m, x.cpu().numpy(), device=device)
              for m, x in (("fundus", fundus), ("oct", oct))}
    model = export_model(model)
    result = {"param_device_after_export_model": str(next(model.parameters()).device),
              "param_dtype": str(next(model.parameters()).dtype)}
    with tempfile.TemporaryDirectory() as tmp:
        for modality, x in (("fundus", fundus), ("oct", oct)):
            arrays = x.cpu().numpy()
            path = Path(tmp) / f"{modality}.onnx"
            export_encoder(model, modality, arrays[:1], path, opset=18, exporter="dynamo")
            numbers, ref_cpu = encoder_parity(model, modality, arrays, path)
            gpu_vs_cpu = float(np.max(np.abs(on_gpu[modality] - ref_cpu)))
            result[modality] = {**numbers, "gpu_fp32_vs_cpu_torch_max_abs": gpu_vs_cpu}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", default="fp32,bf16,bf16 + checkpointing")
    parser.add_argument("--objectives", default="clip,cloob")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this smoke test needs one")
    device = torch.device("cuda:0")
    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(device)
    result: dict = {
        "gpu": props.name, "memory_gib": round(props.total_memory / GIB, 1),
        "capability": list(torch.cuda.get_device_capability(device)), "torch": torch.__version__,
        "cuda": torch.version.cuda, "bf16_native": bf16_native(torch.cuda.get_device_capability(device)),
        "train": {},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "train"}), flush=True)
    for part, run in (("nccl", lambda: nccl_one_process(device)), ("export", lambda: export_parity(device))):
        try:
            result[part] = run()
        except Exception as exc:  # report and go on: the smoke test's other parts still tell something
            result[part] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(part, json.dumps(result[part]), flush=True)
    for objective in args.objectives.split(","):
        for mode in args.modes.split(","):
            name = f"{objective} {mode}"
            try:
                result["train"][name] = train_steps(objective, mode, args.steps, device)
            except Exception as exc:
                result["train"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            torch.cuda.empty_cache()
            print(name, json.dumps(result["train"][name]), flush=True)
    text = json.dumps(result, indent=2)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
