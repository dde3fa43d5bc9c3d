"""The output layer and the cross-entropy in one pass over chunks of tokens, never holding `[tokens, vocab]` logits.

Megatron-Core's loss path materialises the logits of the whole microbatch and then their fp32 copy: at 16,384
tokens and Qwen3's 151,936-token vocabulary that is 4.6 GiB in bf16 plus 9.3 GiB in fp32, with as much again for
their gradient. Here the forward pass computes, chunk by chunk, the logits (bf16 matmul, then fp32 as Megatron's
cross-entropy does), the per-token loss and, at once, the gradients of the chunk's hidden states and of the output
weight; only those are kept for the backward pass, which scales them by the incoming gradient.

The gradients are exact when every counted token gets the same incoming gradient, which is how the loss is used:
summed over the tokens whose label is not ignored (per-token normalisation happens after, on the gradients), or
averaged. A device-side assertion, which never waits for the GPU, guards that contract.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vlm_fsdp.data.batch import IGNORE_INDEX

# rows of fp32 logits per chunk: 1 GiB at a 151,936-token vocabulary
CHUNK_BYTES = 2**30


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def _add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total (fp32) += a @ b, accumulated in fp32 without a bf16 copy of the product where the GPU allows it."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(total, a, b, out_dtype=total.dtype, out=total)
    else:
        total.add_(a @ b)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax of one chunk's logits (in place where they are fp32 already)."""
    logits = logits.float()
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _losses(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -log_probs.gather(1, labels[:, None]).squeeze(1)


def softmax_grad(
    logits: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d logits in the logits' dtype, fp32 per-token loss) of one chunk: the softmax minus the label's
    one-hot, zero for tokens that are not counted. Compiled (`train.compile`), it fuses into two passes over the
    logits; eager, it works in place on one fp32 copy."""
    log_probs = _log_probs(logits)
    losses = _losses(log_probs, labels)
    probs = log_probs.exp_()
    if torch.compiler.is_compiling():
        is_label = torch.arange(probs.shape[1], device=probs.device) == labels[:, None]
        grad = torch.where(is_label, probs - 1.0, probs)
    else:
        grad = probs.index_put_((torch.arange(len(labels), device=labels.device), labels), probs.new_tensor(-1.0), True)
    return grad.mul_(counted[:, None]).to(logits.dtype), losses


SoftmaxGrad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, counted, gradient: SoftmaxGrad):
        rows = _chunk_rows(weight.shape[0])
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        # a frozen output layer (model.freeze_language_model) needs no weight gradient
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        for start in range(0, hidden.shape[0], rows):
            end = start + rows
            h = hidden[start:end]
            grad, losses[start:end] = gradient(h @ weight.t(), labels[start:end], counted[start:end])
            grad_hidden[start:end] = grad @ weight
            if grad_weight is not None:
                _add_product(grad_weight, grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight, counted)
        ctx.weight_dtype = weight.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        grad_hidden, grad_weight, counted = ctx.saved_tensors
        # the one incoming gradient every counted token shares (see the module docstring)
        scale = (grad_losses * counted).sum() / counted.sum().clamp(min=1)
        torch._assert_async(((grad_losses - scale) * counted).abs().amax() <= scale.abs() * 1e-5 + 1e-30)
        grad_weight = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        return grad_hidden * scale, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, gradient: SoftmaxGrad = softmax_grad
) -> torch.Tensor:
    """Per-token cross-entropy (fp32) of `hidden @ weight.T` against `labels`, for `[..., hidden]` states and
    `[...]` labels; tokens labelled IGNORE_INDEX (-100) get 0 and no gradient. `gradient`: `softmax_grad`, or a
    compiled version of it."""
    shape = labels.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    counted = (labels != IGNORE_INDEX).to(torch.float32)
    labels = labels.clamp(min=0)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        losses = _LinearCrossEntropy.apply(hidden, weight, labels, counted, gradient)
    else:
        rows = _chunk_rows(weight.shape[0])
        losses = torch.cat(
            [
                _losses(_log_probs(hidden[i : i + rows] @ weight.t()), labels[i : i + rows])
                for i in range(0, len(labels), rows)
            ]
        )
    return (losses * counted).reshape(shape)
