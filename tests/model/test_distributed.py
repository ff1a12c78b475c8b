"""DDP with 2 processes on CPU (gloo, torchrun): a converted model with frozen BNs gets the
gradients of single-process Eval mode on the same global batch; SyncBatchNorm in eval."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import convbn
from ddp_model import global_batch, make_model
from helpers import rel_err

TESTS = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes_match_single_process_eval(tmp_path):
    out = tmp_path / "grads.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(TESTS / "ddp_worker.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_grads = torch.load(out)

    model = make_model()  # BNs in eval mode, the rest in train mode
    x, y = global_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    worst = max(rel_err(ddp_grads[n], p.grad) for n, p in model.named_parameters())
    print(
        f"DDP (2 processes, Tune) vs single-process Eval: max relative gradient error {worst:.2e}"
    )
    assert worst < 1e-4


def test_sync_batchnorm_model_in_eval():
    model = make_model(sync=True)
    reference = make_model()
    convbn.tune(model)
    assert len(convbn.report(model).converted) == 20
    x, y = global_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert rel_err(a.grad, b.grad) < 1e-4
