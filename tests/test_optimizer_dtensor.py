"""Fused optimizers on DTensor params (FSDP2's representation): 2 CPU ranks over gloo, sharded
params, global-norm clipping; the result equals a single-process run on full tensors."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ftkernels as ftk

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch without distributed")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _opts():
    # No grad_dropout here: its Philox stream is indexed by local element, so shards draw their
    # own (equally valid) masks and the result would differ from an unsharded run.
    return dict(lr=0.05, max_grad_norm=0.5, l2sp=0.1, l1=1e-3, weight_decay=0.01)


def _data():
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(10, 7, generator=g), torch.randn(33, generator=g)]
    grads = [[torch.randn(x.shape, generator=g) for x in w] for _ in range(4)]
    return w, grads


def _worker(rank, world, port, out, opts):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        w, grads = _data()
        params = [torch.nn.Parameter(distribute_tensor(x.clone(), mesh, [Shard(0)])) for x in w]
        opt = ftk.optim.FusedAdamW(params, **opts)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt.step()
        full = [p.full_tensor() for p in params]
        if rank == 0:
            torch.save(full, out)
    finally:
        dist.destroy_process_group()


def test_dtensor_two_ranks_match_single_process(tmp_path):
    out = str(tmp_path / "full.pt")
    mp.start_processes(_worker, args=(2, _free_port(), out, _opts()), nprocs=2, join=True, start_method="spawn")
    w, grads = _data()
    params = [torch.nn.Parameter(x.clone()) for x in w]
    opt = ftk.optim.FusedAdamW(params, **_opts())
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    full = torch.load(out)
    clip = 0.5 / torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads[0]]))
    assert clip < 1  # clipping is active, so the norm must have been global
    for a, b in zip(full, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
