"""The fused, chunked head loss (nanochat.model.head_loss) against the hand math and the
plain path (matmul -> soft-cap -> F.cross_entropy), values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.model import gpt, head_loss
from nanochat.model.head_loss import softcapped_cross_entropy


def test_one_row_by_hand():
    # h = [2], W = [[1], [0]], target 0, cap 15: logits (2, 0), z0 = 15 tanh(2/15), z1 = 0
    hidden = torch.tensor([[2.0]], requires_grad=True)
    weight = torch.tensor([[1.0], [0.0]], requires_grad=True)
    loss = softcapped_cross_entropy(hidden, weight, torch.tensor([0]), 15.0)
    t = math.tanh(2 / 15)
    z0 = 15 * t
    assert loss.item() == pytest.approx(math.log1p(math.exp(-z0)), rel=1e-6)
    loss.backward()
    p0 = 1 / (1 + math.exp(-z0))  # softmax(z)[0]
    g0 = (p0 - 1) * (1 - t * t)  # d loss / d logit 0
    g1 = (1 - p0) * 1.0  # d loss / d logit 1 (tanh'(0) = 1)
    assert hidden.grad.item() == pytest.approx(g0 * 1 + g1 * 0, rel=1e-5)
    assert weight.grad.flatten().tolist() == pytest.approx([g0 * 2, g1 * 2], rel=1e-5)


def plain(hidden, weight, targets):
    return F.cross_entropy(15 * torch.tanh(hidden @ weight.t() / 15), targets, ignore_index=-1)


def test_equals_the_plain_path_over_many_chunks(monkeypatch):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", 7 * 300)  # 7 rows a chunk, a ragged end
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = (0.3 * torch.randn(300, 16)).requires_grad_()
    targets = torch.randint(0, 300, (50,))
    targets[::4] = -1
    want = plain(hidden, weight, targets)
    want.backward()
    want_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = softcapped_cross_entropy(hidden, weight, targets, 15.0)
    (3 * got).backward()  # the upstream gradient scales both
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(hidden.grad, 3 * want_grads[0])
    torch.testing.assert_close(weight.grad, 3 * want_grads[1])


def test_all_rows_ignored_is_nan_like_cross_entropy():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    targets = torch.full((3,), -1)
    assert math.isnan(softcapped_cross_entropy(hidden, weight, targets, 15.0).item())
    assert math.isnan(plain(hidden, weight, targets).item())


def test_model_trains_on_the_fused_path_with_the_plain_loss():
    torch.manual_seed(0)
    config = gpt.config_for_depth(2, 96, sequence_len=16)
    model = gpt.build_model(config, "cpu")
    with torch.no_grad():  # a head away from its near-zero init, so the loss has gradients
        model.lm_head.weight.normal_(0, 0.2)
    idx = torch.randint(0, 96, (3, 16))
    targets = torch.randint(0, 96, (3, 16))
    fused = model(idx, targets)
    fused.backward()
    fused_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(idx)
    reference = F.cross_entropy(logits.view(-1, 96), targets.view(-1))
    reference.backward()
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(fused_grad, model.lm_head.weight.grad)
    with pytest.raises(TypeError, match="fp32 only"):
        softcapped_cross_entropy(
            torch.randn(2, 4).bfloat16(), torch.randn(3, 4), targets[0, :2], 15.0
        )


def test_without_gradients_the_model_takes_the_plain_path(monkeypatch):
    def refuse(*args):
        raise AssertionError("the fused path computes gradients: not under no_grad")

    monkeypatch.setattr(gpt, "softcapped_cross_entropy", refuse)
    config = gpt.config_for_depth(2, 96, sequence_len=16)
    model = gpt.build_model(config, "cpu")
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(model(idx, idx))


def test_backward_of_the_backward_is_refused():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = softcapped_cross_entropy(hidden, torch.randn(16, 8), torch.randint(0, 16, (4,)), 15.0)
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()
