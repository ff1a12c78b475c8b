"""Run under torchrun: DDP fine-tuning step of a converted model; rank 0 writes the gradients.

usage: torchrun --nproc_per_node 2 tests/ddp_worker.py OUT.pt
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import convbn  # noqa: E402
from ddp_model import global_batch, make_model  # noqa: E402


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # DDP refuses SyncBatchNorm on CPU; SyncBatchNorm is covered without DDP elsewhere.
    model = convbn.tune(make_model(), freeze_bn=True).train()
    assert convbn.report(model).converted
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = global_batch()
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    loss = nn.functional.cross_entropy(ddp(x[shard]), y[shard])
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
