"""SyncBatchNorm semantics: two gloo ranks with half a batch each equal one process with all of it.

Covers BatchNormSwish (fused op, torch and triton backends) and BatchNorm2d (plain BN).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nvae_fast
from nvae_fast import BatchNormSwish
from nvae_fast.nn import BatchNorm2d

WORLD = 2


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 5, 3, generator=g) * 2 + 0.5
    dy = torch.randn(4, 6, 5, 3, generator=g)
    return x, dy


def _run(module, x, dy, backend):
    x = x.clone().requires_grad_()
    with nvae_fast.use_backend(backend):
        y = module(x)
        y.backward(dy)
    return y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()


MODULES = {"bn_swish": BatchNormSwish, "bn": BatchNorm2d}


def _worker(rank, init_file, backend, module, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, dy = _data()
        half = x.shape[0] // WORLD
        m = MODULES[module](6, momentum=0.05)
        y, dx, dw, db = _run(m, x[rank * half:(rank + 1) * half], dy[rank * half:(rank + 1) * half], backend)
        dist.all_reduce(dw)
        dist.all_reduce(db)
        ys, dxs = [torch.empty_like(y) for _ in range(WORLD)], [torch.empty_like(dx) for _ in range(WORLD)]
        dist.all_gather(ys, y)
        dist.all_gather(dxs, dx)
        if rank == 0:
            torch.save({"y": torch.cat(ys), "dx": torch.cat(dxs), "dw": dw, "db": db,
                        "running_mean": m.running_mean, "running_var": m.running_var}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("module,backend", [("bn_swish", "torch"), ("bn_swish", "triton"), ("bn", "torch")])
def test_two_ranks_equal_one_process_on_joined_batch(tmp_path, monkeypatch, module, backend):
    # CPU tensors in the ranks: on a GPU machine too, where the triton case needs the interpreter there.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out_file = tmp_path / "out.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), backend, module, str(out_file)), nprocs=WORLD, join=True)
    got = torch.load(out_file)

    x, dy = _data()
    m = MODULES[module](6, momentum=0.05)
    y, dx, dw, db = _run(m, x, dy, "torch")
    for name, expected in (("y", y), ("dx", dx), ("dw", dw), ("db", db), ("running_mean", m.running_mean),
                           ("running_var", m.running_var)):
        torch.testing.assert_close(got[name], expected, atol=1e-5, rtol=1e-5, msg=name)
