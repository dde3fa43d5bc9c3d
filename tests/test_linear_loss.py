"""The chunked output layer + cross-entropy (`vlm_fsdp.model.linear_loss`) against logits and torch's
cross-entropy: losses and gradients over several chunks, ignored tokens (which get no output-layer work), a frozen
weight, the host's count of labelled tokens, and the contract on the incoming gradient."""

from __future__ import annotations

import pytest
import torch
from vlm_fsdp.model import linear_loss, loss_chunks
from vlm_fsdp.model.linear_loss import linear_cross_entropy

VOCAB = 1000


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(loss_chunks, "CHUNK_BYTES", 4 * VOCAB * 7)  # 7 tokens per chunk: 33 tokens make 5 chunks


def _inputs(dtype, weight_grad=True):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(VOCAB, 16, dtype=dtype, requires_grad=weight_grad)
    labels = torch.randint(0, VOCAB, (3, 11))
    labels[0, :4] = labels[2, -1] = -100
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


@pytest.mark.parametrize("chunk_rows", [7, 64], ids=["several chunks", "one chunk"])
@pytest.mark.parametrize(("dtype", "bound"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_losses_and_gradients_equal_cross_entropy_over_the_logits(dtype, bound, chunk_rows, monkeypatch):
    monkeypatch.setattr(loss_chunks, "CHUNK_BYTES", 4 * VOCAB * chunk_rows)
    hidden, weight, labels = _inputs(dtype)
    losses = linear_cross_entropy(hidden, weight, labels)
    (losses.sum() * 0.37).backward()
    ours = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    reference = _reference(hidden, weight, labels)
    (reference.sum() * 0.37).backward()
    assert (losses - reference).abs().max() < 1e-5
    assert losses[labels == -100].eq(0).all()
    for got, expected in zip(ours, (hidden.grad, weight.grad), strict=True):
        assert got.dtype == expected.dtype
        assert (got - expected).abs().max() / expected.abs().max() < bound
    with torch.no_grad():
        assert (linear_cross_entropy(hidden, weight, labels) - reference).abs().max() < 1e-5


def test_only_labelled_tokens_pass_through_the_output_layer():
    """33 tokens, 5 without a label: the softmax gradient sees 28 rows (4 chunks of at most 7), those of the
    labelled tokens, and the host's count gives what reading the count from the labels gives."""
    hidden, weight, labels = _inputs(torch.float32)
    seen = []

    def recording(logits, targets):
        seen.append(targets)
        return linear_loss.softmax_grad(logits, targets)

    count = int((labels != -100).sum())
    losses = linear_cross_entropy(hidden, weight, labels, count=count, gradient=recording)
    assert [len(t) for t in seen] == [7, 7, 7, 7]
    assert torch.equal(torch.cat(seen), labels[labels != -100])
    assert torch.equal(losses, linear_cross_entropy(hidden, weight, labels))
    losses.sum().backward()
    assert hidden.grad[labels == -100].eq(0).all() and hidden.grad[labels != -100].ne(0).any()


def test_a_wrong_count_of_labelled_tokens_is_refused():
    hidden, weight, labels = _inputs(torch.float32)
    with pytest.raises(RuntimeError):
        linear_cross_entropy(hidden, weight, labels, count=int((labels != -100).sum()) - 1)


def test_a_microbatch_without_labels_has_zero_loss_and_gradient():
    hidden, weight, labels = _inputs(torch.float32)
    labels[:] = -100
    losses = linear_cross_entropy(hidden, weight, labels, count=0)
    losses.sum().backward()
    assert losses.eq(0).all() and hidden.grad.eq(0).all() and weight.grad.eq(0).all()


def test_a_frozen_output_weight_gets_no_gradient():
    hidden, weight, labels = _inputs(torch.float32, weight_grad=False)
    linear_cross_entropy(hidden, weight, labels).sum().backward()
    reference = hidden.grad
    hidden.grad = None
    _reference(hidden, weight, labels).sum().backward()
    assert weight.grad is None and torch.allclose(reference, hidden.grad, atol=1e-6)


def test_tokens_weighted_differently_are_refused():
    """The gradients are computed in the forward pass for one shared incoming gradient: weighting counted tokens
    differently would get wrong gradients, and the device-side assertion stops it (on the CPU, at once)."""
    hidden, weight, labels = _inputs(torch.float32)
    losses = linear_cross_entropy(hidden, weight, labels)
    with pytest.raises(RuntimeError):
        losses[0].sum().backward()


def test_the_compiled_softmax_gradient_is_the_eager_one_for_any_chunk_length():
    """What `train.compile` runs: one graph for chunks of any length (the last chunk is shorter), with the eager
    gradients and losses. Captured whole and run through `aot_eager`, as in tests/test_compile.py."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    compiled = torch.compile(linear_loss.softmax_grad, dynamic=True, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    for rows in (7, 5):
        logits = torch.randn(rows, VOCAB, dtype=torch.bfloat16)
        labels = torch.randint(0, VOCAB, (rows,))
        expected = linear_loss.softmax_grad(logits.clone(), labels)
        got = compiled(logits.clone(), labels)
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    torch._dynamo.reset()
