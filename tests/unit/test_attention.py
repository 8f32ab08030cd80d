"""Sliding-window attention through flex attention equals the masked SDPA reference
(nanochat/model/attention.py) on the CPU: flex's unfused reference path, and the compiled
kernel (inductor compiles it for the CPU here). Forward only: torch's flex attention has no
backward on the CPU; the GPU check (scripts/gpu_check.sh) trains through it."""

from __future__ import annotations

import pytest
import torch

from nanochat.model import attention

# flex's unfused reference path warns that it is unfused: that is the point here
pytestmark = pytest.mark.filterwarnings(
    "ignore:flex_attention called without torch.compile", "ignore::DeprecationWarning"
)


def qkv(n_head: int, n_kv_head: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, n_head, length, 16), (2, n_kv_head, length, 16), (2, n_kv_head, length, 16)]
    return [torch.randn(*s, generator=g) for s in shapes]


def reference(q, k, v, window: int):
    return attention.sdpa_attention(q, k, v, attention.attention_mask(0, q.size(2), window))


@pytest.mark.parametrize(
    "n_head, n_kv_head, length, window",
    [(4, 4, 64, 16), (4, 2, 200, 50), (4, 1, 130, 129), (2, 2, 300, 1)],
    ids=["mha", "gqa-ragged-blocks", "mqa-window-just-short", "window-one"],
)
def test_flex_windows_equal_the_masked_reference(n_head, n_kv_head, length, window):
    q, k, v = qkv(n_head, n_kv_head, length)
    got = attention.flex_windowed_attention(q, k, v, window, compiled=False)
    torch.testing.assert_close(got, reference(q, k, v, window), rtol=0, atol=2e-6)


def test_the_compiled_flex_kernel_equals_the_masked_reference():
    q, k, v = qkv(4, 2, 200, seed=3)
    got = attention.flex_windowed_attention(q, k, v, 64, compiled=True)
    torch.testing.assert_close(got, reference(q, k, v, 64), rtol=0, atol=1e-5)


def test_flex_serves_windows_on_cuda_only_and_only_where_they_cut():
    class Fake:
        def __init__(self, cuda: bool, length: int):
            self.is_cuda, self.length = cuda, length

        def size(self, dim: int) -> int:
            return self.length

    assert attention.flex_usable(Fake(True, 2048), 512)
    assert not attention.flex_usable(Fake(True, 2048), None)  # full context: SDPA is_causal
    assert not attention.flex_usable(Fake(True, 256), 512)  # the window cuts nothing
    assert not attention.flex_usable(Fake(False, 2048), 512)  # CPU: the masked SDPA


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU here: the compiled flex kernel's forward and backward on CUDA run in "
    "scripts/gpu_check.sh on a lent GPU",
)
def test_cuda_flex_trains_like_the_masked_reference():  # pragma: no cover - needs a GPU
    q, k, v = (t.cuda().bfloat16().requires_grad_() for t in qkv(4, 2, 1024, seed=5))
    grad = torch.randn(2, 4, 1024, 16, device="cuda", dtype=torch.bfloat16)
    got = attention.flex_windowed_attention(q, k, v, 256)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    mask = attention.attention_mask(0, 1024, 256, "cuda")
    expected = attention.sdpa_attention(q, k, v, mask)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)
    for a, b in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-2)
