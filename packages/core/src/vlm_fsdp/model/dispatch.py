"""Token dispatch without host synchronisation when every expert lives on this rank.

Megatron-Core's dispatchers permute tokens with `masked_select` and copy the token count per expert to the host:
two or three synchronisations per MoE layer and microbatch, each of which stops the host from running ahead of
the GPU. With expert- and tensor-parallel size 1 no communication is needed and, without token dropping, the
number of routed (token, expert) pairs is known in advance (tokens x top-k), so the permutation can stay on the
GPU: a stable sort of the routing map puts the pairs in Megatron's order (by expert, then by token), and the
expert outputs are added back into their tokens' rows.

Both directions gather rows and never scatter them: `index_select`'s backward and `scatter_add_` add rows with
atomic operations (on one H200, 0.75 ms per layer and microbatch of 4,096 tokens at top-8, against a gather's
tens of microseconds), so every gather here takes a second index, the positions of each row's copies, for its
gradient (`_gather_rows`).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher


class _GatherRows(torch.autograd.Function):
    """`source[index]` where `index` takes every row of `source` equally often, and `copies[row * n : (row + 1) * n]`
    are the positions of row's n copies in the result: the gradient sums each row's copies by gathering them."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, index: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(copies)
        ctx.rows = source.shape[0]
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (copies,) = ctx.saved_tensors
        gathered = grad.index_select(0, copies)
        if gathered.shape[0] != ctx.rows:
            gathered = gathered.view(ctx.rows, -1, grad.shape[-1]).sum(1)
        return gathered, None, None


_gather_rows = _GatherRows.apply


class LocalTokenDispatcher(MoETokenDispatcher):
    """Dispatch to the experts of this rank, in Megatron's order, with every tensor kept on the GPU."""

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = hidden_states.shape
        tokens = hidden_states.view(-1, self.hidden_shape[-1])
        num_tokens = tokens.shape[0]
        # [experts * tokens] flags, expert-major; the stable sort brings the routed pairs first, in that order
        flags = routing_map.T.reshape(-1).to(torch.int8)
        pairs = torch.argsort(flags, descending=True, stable=True)[: num_tokens * self.config.moe_router_topk]
        token_index = pairs % num_tokens
        # the pairs by token, then by expert: each token's top-k positions in the expert-major order, and back
        self.by_token = torch.argsort(token_index * routing_map.shape[1] + pairs // num_tokens)
        self.position = torch.empty_like(self.by_token).scatter_(
            0, self.by_token, torch.arange(self.by_token.numel(), device=pairs.device)
        )
        self.tokens_per_expert = routing_map.sum(dim=0)
        self.gathered_from = (tokens, token_index)
        routed = _gather_rows(tokens, token_index, self.by_token)
        return routed, probs.T.reshape(-1).index_select(0, pairs)

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, self.tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_shape[-1]
        by_token = _gather_rows(hidden_states, self.by_token, self.position)
        return by_token.view(self.hidden_shape.numel() // hidden, -1, hidden).sum(1).view(self.hidden_shape)


class MoE(MoELayer):
    """Megatron-Core's MoE layer, dispatching through `LocalTokenDispatcher` when it holds every expert and
    drops no tokens (otherwise through the dispatcher `moe_token_dispatcher_type` names); then the experts gather
    their input again in the backward pass instead of keeping it (`GroupedExperts.forward`)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None) -> None:
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection)
        dispatcher = self.token_dispatcher
        dropless = config.moe_expert_capacity_factor is None and not config.moe_router_padding_for_quantization
        if dispatcher.ep_size == 1 and dispatcher.tp_size == 1 and dropless:
            self.token_dispatcher = LocalTokenDispatcher(config, pg_collection=pg_collection)

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        dispatcher = self.token_dispatcher
        if not isinstance(dispatcher, LocalTokenDispatcher):
            return super().routed_experts_compute(hidden_states, probs)
        (source, index), dispatcher.gathered_from = dispatcher.gathered_from, None
        return self.experts(hidden_states, dispatcher.tokens_per_expert, probs, source, index)
