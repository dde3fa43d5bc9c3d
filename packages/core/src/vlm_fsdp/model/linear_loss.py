"""The output layer and the cross-entropy in one pass over chunks of tokens, never holding `[tokens, vocab]` logits,
and only over the tokens that have a label.

Megatron-Core's loss path materialises the logits of the whole microbatch and then their fp32 copy: at 16,384
tokens and Qwen3's 151,936-token vocabulary that is 4.6 GiB in bf16 plus 9.3 GiB in fp32, with as much again for
their gradient. Here the rows of the tokens with a label are gathered first (in supervised fine-tuning most tokens
have none: the prompt, the image tokens, padding), and the forward pass computes, chunk by chunk of those rows, the
logits (bf16 matmul, then fp32 as Megatron's cross-entropy does), the per-token loss and, at once, the gradients of
the rows' hidden states and of the output weight; only those are kept for the backward pass, which scales them by
the incoming gradient and puts the rows' gradients back in place (the other rows' gradient is zero).

The gradients are exact when every counted token gets the same incoming gradient, which is how the loss is used:
summed over the tokens whose label is not ignored (per-token normalisation happens after, on the gradients), or
averaged. A device-side assertion, which never waits for the GPU, guards that contract.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vlm_fsdp.data.batch import IGNORE_INDEX
from vlm_fsdp.model.loss_chunks import chunk_rows


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax of one chunk's logits (in place where they are fp32 already)."""
    logits = logits.float()
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _losses(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -log_probs.gather(1, labels[:, None]).squeeze(1)


def softmax_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d logits in the logits' dtype, fp32 per-token loss) of one chunk: the softmax minus the label's
    one-hot. Compiled (`train.compile`), it fuses into two passes over the logits; eager, it works in place on one
    fp32 copy."""
    log_probs = _log_probs(logits)
    losses = _losses(log_probs, labels)
    probs = log_probs.exp_()
    if torch.compiler.is_compiling():
        is_label = torch.arange(probs.shape[1], device=probs.device) == labels[:, None]
        grad = torch.where(is_label, probs - 1.0, probs)
    else:
        grad = probs.index_put_((torch.arange(len(labels), device=labels.device), labels), probs.new_tensor(-1.0), True)
    return grad.to(logits.dtype), losses


SoftmaxGrad = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token losses of the `rows` of `hidden` (`[tokens, hidden]`) against `labels` (one per row)."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, labels, gradient: SoftmaxGrad):
        chunk = chunk_rows(weight.shape[0])
        starts = range(0, len(rows), chunk)
        selected = hidden.index_select(0, rows)
        losses = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)
        grad_selected = torch.empty_like(selected)
        # a frozen output layer (model.freeze_language_model) needs no weight gradient; otherwise it is added up
        # chunk by chunk in the weight's dtype, each product accumulated in fp32 and rounded once, as gradients are
        # added up over the microbatches of a step
        wants_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros_like(weight) if wants_weight and not starts else None
        for start in starts:
            end = start + chunk
            h = selected[start:end]
            grad, losses[start:end] = gradient(h @ weight.t(), labels[start:end])
            grad_selected[start:end] = grad @ weight
            if wants_weight:
                grad_weight = grad.t() @ h if grad_weight is None else grad_weight.addmm_(grad.t(), h)
        ctx.save_for_backward(grad_selected, grad_weight, rows)
        ctx.tokens = hidden.shape[0]
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        grad_selected, grad_weight, rows = ctx.saved_tensors
        # the one incoming gradient every counted token shares (see the module docstring)
        scale = grad_losses.sum() / max(len(rows), 1)
        if len(rows):
            torch._assert_async((grad_losses - scale).abs().amax() <= scale.abs() * 1e-5 + 1e-30)
        # scaled in place: the weight's gradient is as large as the weight, and the backward pass runs once
        grad_hidden = grad_selected.new_zeros(ctx.tokens, grad_selected.shape[1])
        grad_hidden.index_copy_(0, rows, grad_selected.mul_(scale))
        if grad_weight is not None:
            grad_weight.mul_(scale)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    count: int | None = None,
    gradient: SoftmaxGrad = softmax_grad,
) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of `hidden @ weight.T` against `labels`, for `[..., hidden]` states and
    `[...]` labels; tokens labelled IGNORE_INDEX (-100) get 0 and no gradient, and no output-layer work. `count`:
    the number of labelled tokens, known on the host, so that finding them does not wait for the GPU (without it,
    it is read from the GPU). `gradient`: `softmax_grad`, or a compiled version of it."""
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    labelled = labels != IGNORE_INDEX
    if count is None:
        count = int(labelled.sum())
    else:
        torch._assert_async(labelled.sum() == count)
    rows = torch.nonzero_static(labelled, size=count).squeeze(1)
    targets = labels.index_select(0, rows)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        losses = _LinearCrossEntropy.apply(hidden, weight, rows, targets, gradient)
    else:
        chunk = chunk_rows(weight.shape[0])
        selected = hidden.index_select(0, rows)
        losses = torch.cat(
            [
                _losses(_log_probs(selected[i : i + chunk] @ weight.t()), targets[i : i + chunk])
                for i in range(0, count, chunk)
            ]
            or [hidden.new_empty(0, dtype=torch.float32)]
        )
    return losses.new_zeros(len(labels)).index_copy(0, rows, losses).reshape(shape)
