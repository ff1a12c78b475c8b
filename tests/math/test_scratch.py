"""Tune's CPU scratch memory: the transient w' and G * a share one buffer per thread and dtype.

Every pair writes into the same buffer, so these tests check that no result, saved
tensor or gradient ever lives in it, that it is only used where nothing can keep it,
and that threads do not share it.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

import convbn._math.tune_autograd as ta
from convbn.functional import tune_forward


def _eval_bn(c, cls=nn.BatchNorm2d):
    bn = cls(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn.eval()


def _pairs():
    # Weight-sized w' (large feature map), G * a (small feature map, large weight),
    # a transposed convolution and a linear map: each writes the scratch buffer.
    return [
        (nn.Conv2d(3, 8, 3, padding=1), _eval_bn(8), (2, 3, 12, 12)),
        (nn.Conv2d(32, 64, 3, bias=False), _eval_bn(64), (1, 32, 3, 3)),
        (nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2), _eval_bn(6), (2, 8, 5, 5)),
        (nn.Linear(40, 30), _eval_bn(30, nn.BatchNorm1d), (4, 40)),
    ]


def _buffers():
    return list(getattr(ta._SCRATCH, "buffers", {}).values())


def _inside(t, buffers):
    start = t.untyped_storage().data_ptr()
    return any(start == b.untyped_storage().data_ptr() for b in buffers)


def _tune_and_eval(producer, bn, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    params = [x, producer.weight, bn.weight, bn.bias]
    if producer.bias is not None:
        params.append(producer.bias)
    out = tune_forward(x, producer, bn)
    g = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, params, g)
    ref_out = bn(producer(x))
    ref = torch.autograd.grad(ref_out, params, g)
    return out, got, ref_out, ref


def test_pairs_in_turn_share_the_buffer_and_equal_eval(monkeypatch):
    used = []
    real = ta._scratch

    def spy(shape, like):
        out = real(shape, like)
        used.append(out is not None)
        return out

    monkeypatch.setattr(ta, "_scratch", spy)
    results = []
    for step in range(2):
        for i, (producer, bn, shape) in enumerate(_pairs()):
            results.append(_tune_and_eval(producer, bn, shape, seed=10 * step + i))
    assert sum(used) >= 8, "the scratch buffer was not used"
    buffers = _buffers()
    assert buffers
    # Later pairs overwrote the buffer: every output and gradient must be unaffected.
    for out, got, ref_out, ref in results:
        assert not _inside(out, buffers)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, ref):
            assert not _inside(a, buffers)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_no_scratch_while_a_graph_is_recorded_or_off_the_cpu():
    like = torch.ones(3)
    with torch.no_grad():
        assert ta._scratch(torch.Size([2, 3]), like) is not None
        assert ta._scratch(torch.Size([2, 3]), torch.ones(3, device="meta")) is None
        too_big = ta._SCRATCH_MAX_BYTES // like.element_size() + 1
        assert ta._scratch(torch.Size([too_big]), like) is None

        class Sub(torch.Tensor):
            pass

        assert ta._scratch(torch.Size([2, 3]), like.as_subclass(Sub)) is None
        assert ta._scratch(torch.Size([2, 3]), nn.Parameter(like)) is not None
    # Grad mode on: a double backward records the graph, and a recorded tensor must
    # never be overwritten by the next pair.
    assert ta._scratch(torch.Size([2, 3]), like) is None


def test_buffer_made_under_inference_mode_serves_training_after(monkeypatch):
    monkeypatch.setattr(ta, "_SCRATCH", threading.local())  # a fresh buffer for this test
    producer, bn, shape = _pairs()[0]  # w' goes to the scratch buffer in forward
    x = torch.randn(shape)
    with torch.inference_mode():
        first = tune_forward(x, producer, bn)
    assert not _buffers()[0].is_inference()
    out, got, ref_out, ref = _tune_and_eval(producer, bn, shape, seed=3)
    torch.testing.assert_close(first.clone(), bn(producer(x)).detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_threads_have_their_own_buffer():
    # Two threads stepping different pairs at once: shared scratch memory would mix them.
    workers = 2
    pairs = _pairs()[:2]
    expected = [_tune_and_eval(p, b, s, seed=100 + i) for i, (p, b, s) in enumerate(pairs)]
    errors: list[BaseException] = []
    owners: list[list[torch.Tensor]] = [[] for _ in range(workers)]

    def run(k):
        try:
            producer, bn, shape = pairs[k]
            for _ in range(30):
                out, got, _, _ = _tune_and_eval(producer, bn, shape, seed=100 + k)
                torch.testing.assert_close(out, expected[k][0])
                for a, b in zip(got, expected[k][1]):
                    torch.testing.assert_close(a, b)
            owners[k] = _buffers()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    ptrs = [{b.data_ptr() for b in bufs} for bufs in owners]
    assert all(ptrs) and not (ptrs[0] & ptrs[1])
