"""Token dispatch without host synchronisation when every expert lives on this rank.

Megatron-Core's dispatchers permute tokens with `masked_select` and copy the token count per expert to the host:
two or three synchronisations per MoE layer and microbatch, each of which stops the host from running ahead of
the GPU. With expert- and tensor-parallel size 1 no communication is needed and, without token dropping, the
number of routed (token, expert) pairs is known in advance (tokens x top-k), so the permutation can stay on the
GPU: a stable sort of the routing map puts the pairs in Megatron's order (by expert, then by token), and the
expert outputs are added back into their tokens' rows.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher


class LocalTokenDispatcher(MoETokenDispatcher):
    """Dispatch to the experts of this rank, in Megatron's order, with every tensor kept on the GPU."""

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = hidden_states.shape
        tokens = hidden_states.view(-1, self.hidden_shape[-1])
        num_tokens = tokens.shape[0]
        # [experts * tokens] flags, expert-major; the stable sort brings the routed pairs first, in that order
        flags = routing_map.T.reshape(-1).to(torch.int8)
        pairs = torch.argsort(flags, descending=True, stable=True)[: num_tokens * self.config.moe_router_topk]
        self.token_index = pairs % num_tokens
        self.tokens_per_expert = routing_map.sum(dim=0)
        return tokens.index_select(0, self.token_index), probs.T.reshape(-1).index_select(0, pairs)

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
        out = hidden_states.new_zeros(self.hidden_shape.numel() // hidden, hidden)
        out.scatter_add_(0, self.token_index.unsqueeze(1).expand(-1, hidden), hidden_states)
        return out.view(self.hidden_shape)


class MoE(MoELayer):
    """Megatron-Core's MoE layer, dispatching through `LocalTokenDispatcher` when it holds every expert and
    drops no tokens (otherwise through the dispatcher `moe_token_dispatcher_type` names)."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None) -> None:
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection)
        dispatcher = self.token_dispatcher
        dropless = config.moe_expert_capacity_factor is None and not config.moe_router_padding_for_quantization
        if dispatcher.ep_size == 1 and dispatcher.tp_size == 1 and dropless:
            self.token_dispatcher = LocalTokenDispatcher(config, pg_collection=pg_collection)
