"""`retina train` under torchrun with the launcher arguments a cluster uses (c10d rendezvous endpoint
and id, --nnodes, --nproc-per-node), here 2 CPU processes on one node; and the process group is torn
down when training fails. Single-process equivalence of the losses and gradients is tests/test_ddp.py's."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import uuid

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from fixtures_models import write_noise_cohort  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_with_cluster_launcher_arguments_trains_one_run(tmp_path):
    manifest = write_noise_cohort(tmp_path / "cohort", patients=4)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", "2", "--node-rank", "0",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        "--rdzv-id", f"retina-{uuid.uuid4().hex[:8]}",
        "-m", "retinacli.cli", "train", "--manifest", str(manifest), "--out", str(out),
        "--preset", "tiny", "--epochs", "1", "--threads", "1", "--oct-slices", "2", "--oct-size", "16",
        "--fundus-size", "16", "--embed-dim", "8", "--device", "auto", "--activation-checkpointing",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # one run, written once by rank 0: the global batch of 4 split over 2 processes
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["batch_size"] == 4 and record["epoch"] == 1
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
    assert record["val"]["fundus_to_oct"]["pool_size"] == 2
    log = (out / "train.log").read_text()
    assert "device cpu" in log and "2 process(es)" in log  # `auto` resolved per rank; both joined
    assert json.loads((out / "config.json").read_text())["activation_checkpointing"] is True
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def _failing_worker(rank: int, port: int, manifest: str, out: str, result: str) -> None:
    from training.config import resolve_config
    from training.loop import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = resolve_config("tiny", overrides={"manifest": manifest, "threads": 1, "epochs": 1})
    try:
        train(config, out)
    except ValueError as exc:  # 1 training pair: too few for 2 processes
        with open(f"{result}.{rank}", "w") as handle:
            json.dump({"error": str(exc), "initialized_after": dist.is_initialized()}, handle)


@pytest.mark.slow
def test_a_failing_run_destroys_the_process_group_on_every_rank(tmp_path):
    manifest = write_noise_cohort(tmp_path / "cohort", patients=2, visits=1)
    result = str(tmp_path / "result")
    mp.spawn(_failing_worker, args=(_free_port(), str(manifest), str(tmp_path / "run"), result), nprocs=2)
    for rank in range(2):
        with open(f"{result}.{rank}") as handle:
            got = json.load(handle)
        assert "too few for contrastive training" in got["error"]
        assert got["initialized_after"] is False
