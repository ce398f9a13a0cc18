"""process_group (domain parallelism) and DistributedDataParallel, with 2 gloo processes on loopback."""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import groupnorm.numpy
import groupnorm.torch as gt
from support import hard_data, reference_group_norm

WORLD = 2
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(worker: object, out: Path) -> None:
    """Run ``worker(rank, port, out)`` on 2 processes, bounded in time; fail if any process fails."""
    port = _free_port()
    context = mp.start_processes(worker, args=(port, str(out)), nprocs=WORLD, join=False, start_method="spawn")  # type: ignore[arg-type]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError("distributed workers did not finish in time")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _init(rank: int, port: int) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )


# ------------------------------------------------------------------------------------------ sharded

SHAPE = (2, 8, 10, 6)  # NCHW; rank 0 holds rows 0..6, rank 1 rows 7..9 (uneven shards)
SPLIT = 7


def _sharded_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x = hard_data(SHAPE, 1, 1e3, dtype=np.float64)
    x[:, :, SPLIT:] += 5.0  # the shards' means differ: the merge must be exact, not an average of means
    rng = np.random.default_rng(7)
    return x, rng.standard_normal(SHAPE), np.linspace(0.5, 2, 8), np.linspace(-1, 1, 8)


def _sharded_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    x, dy, gamma, beta = _sharded_data()
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    xt = torch.from_numpy(x[:, :, rows].copy()).requires_grad_()
    g, b = torch.from_numpy(gamma).requires_grad_(), torch.from_numpy(beta).requires_grad_()
    y = gt.group_norm(xt, 4, g, b, activation="silu", process_group=dist.group.WORLD)
    y.backward(torch.from_numpy(dy[:, :, rows].copy()))
    m = gt.GroupNorm(4, 8, dtype=torch.float64, process_group=dist.group.WORLD)
    y2 = m(torch.from_numpy(x[:, :, rows].copy()))
    assert xt.grad is not None
    assert g.grad is not None
    assert b.grad is not None
    np.savez(
        Path(out) / f"rank{rank}.npz",
        y=y.detach().numpy(),
        dx=xt.grad.numpy(),
        dg=g.grad.numpy(),
        db=b.grad.numpy(),
        y2=y2.detach().numpy(),
    )
    dist.destroy_process_group()


def test_process_group_shards_along_a_reduction_axis(tmp_path: Path) -> None:
    _run(_sharded_worker, tmp_path)
    x, dy, gamma, beta = _sharded_data()
    want_y = reference_group_norm(x, 4, 1, (2, 3), gamma, beta, 1e-5, "silu")
    want = groupnorm.numpy.vjp(x, dy, 4, 1, (2, 3), gamma=gamma, beta=beta, epsilon=1e-5, activation_fn="silu")
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(WORLD)]
    np.testing.assert_allclose(np.concatenate([r["y"] for r in ranks], axis=2), want_y, atol=1e-10)
    np.testing.assert_allclose(
        np.concatenate([r["y2"] for r in ranks], axis=2),
        reference_group_norm(x, 4, 1, (2, 3), epsilon=1e-5),
        atol=1e-10,
    )
    np.testing.assert_allclose(np.concatenate([r["dx"] for r in ranks], axis=2), want.inputs, atol=1e-10)
    np.testing.assert_allclose(sum(r["dg"] for r in ranks), want.gamma, atol=1e-10)
    np.testing.assert_allclose(sum(r["db"] for r in ranks), want.beta, atol=1e-10)


# -------------------------------------------------------------------------------------------- DDP


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        gt.GroupNorm(4, 8, activation="silu"),
        torch.nn.Conv2d(8, 4, 3, padding=1),
        gt.GroupNorm(2, 4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3),
    ).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))
        for _ in range(3)
    ]


def _train(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, t in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), t).backward()
        opt.step()


def _ddp_worker(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    half = [(x[2 * rank : 2 * rank + 2], t[2 * rank : 2 * rank + 2]) for x, t in _batches()]
    _train(model, half)
    if rank == 0:
        torch.save(model.module.state_dict(), Path(out) / "ddp.pt")
    dist.destroy_process_group()


def test_ddp_training_equals_single_process(tmp_path: Path) -> None:
    _run(_ddp_worker, tmp_path)
    single = _model()
    _train(single, _batches())
    trained = torch.load(tmp_path / "ddp.pt")
    for key, value in single.state_dict().items():
        torch.testing.assert_close(trained[key], value, atol=1e-10, rtol=1e-10)
