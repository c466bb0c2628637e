"""Two CPU processes (gloo) give the same loss and gradients as one process on the concatenated batch."""

from __future__ import annotations

import os
import socket

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from training.config import resolve_config  # noqa: E402
from training.loop import step_loss  # noqa: E402
from training.model import build_model  # noqa: E402

OBJECTIVES = ("clip", "cloob")
WORLD = 2
GLOBAL_BATCH = 4
SMALL = {"oct_slices": 2, "oct_size": 16, "fundus_size": 16, "embed_dim": 8, "learn_inv_tau": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    gen = torch.Generator().manual_seed(1)
    fundus = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=gen)
    oct = torch.randn(GLOBAL_BATCH, 1, 2, 16, 16, generator=gen)
    return fundus, oct


def _model(objective):
    torch.manual_seed(0)
    # eval(): BatchNorm uses its running statistics, which are the same in every process (in
    # training mode each process normalises its own half-batch, as usual with DDP).
    return build_model(resolve_config("tiny", overrides={"objective": objective, **SMALL})).eval()


def _loss_and_grads(model, loss) -> dict:
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    fundus, oct = _batch()
    mine = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    results = {}
    for objective in OBJECTIVES:
        model = _model(objective)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        results[objective] = _loss_and_grads(model, step_loss(ddp, fundus[mine], oct[mine]))
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(_free_port(), out_path), nprocs=WORLD, join=True)
    distributed = torch.load(out_path, weights_only=True)
    fundus, oct = _batch()
    for objective in OBJECTIVES:
        model = _model(objective)
        single = _loss_and_grads(model, step_loss(model, fundus, oct))
        got = distributed[objective]
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-5, atol=1e-6)
        assert single["loss"] > 0
        for name, grad in single["grads"].items():
            message = f"{objective} {name}"
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=message)
        # The temperatures' gradients too (not scaled by the world size).
        temperature = "log_inv_tau" if objective == "cloob" else "logit_scale"
        assert single["grads"][temperature].abs() > 0


def _train_worker(rank: int, port: int, manifest: str, out: str) -> None:
    from training.loop import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    config = resolve_config("tiny", overrides={"manifest": manifest, "threads": 1, "epochs": 1, **SMALL})
    train(config, out)
    assert not dist.is_initialized()  # train() destroys the process group it made


@pytest.mark.slow
def test_training_loop_runs_under_two_processes(tmp_path):
    import json

    from fixtures_models import write_noise_cohort

    manifest = write_noise_cohort(tmp_path / "cohort", patients=4)
    out = tmp_path / "run"
    mp.spawn(_train_worker, args=(_free_port(), str(manifest), str(out)), nprocs=WORLD, join=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # written once, by rank 0
    record = json.loads(lines[0])
    assert record["batch_size"] == 4 and record["val"]["fundus_to_oct"]["pool_size"] == 2
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
