"""One declarative name mapping between Hugging Face Qwen3-VL-MoE tensors and ours, used in both directions.

Entry kinds:
- `Plain`: one tensor, renamed (norms, projections, router, embeddings, output layer; the vision tower's tensors
  are replicated as they are under `vision.`).
- `FusedQKV`: Hugging Face's separate q/k/v projections <-> Megatron-Core's fused `linear_qkv`, whose rows are
  grouped per key/value head: [q heads of group 0, k of group 0, v of group 0, q heads of group 1, ...].
- `StackedExperts`: all experts of a layer stacked in one 3D tensor. Transformers 5 uses `[experts, out, in]`, as
  we do; checkpoints published for transformers 4 store `[experts, in, out]`, which is recognised by its shape
  and transposed on the way in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.plan.params import vision_param_shapes

HF_TEXT = "model.language_model."
HF_VISION = "model.visual."


@dataclass(frozen=True)
class Plain:
    ours: str
    hf_name: str

    @property
    def hf(self) -> tuple[str, ...]:
        return (self.hf_name,)

    def to_ours(self, tensors: Sequence[torch.Tensor], model: ModelConfig) -> torch.Tensor:
        return tensors[0]

    def to_hf(self, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
        return [tensor]


@dataclass(frozen=True)
class FusedQKV:
    ours: str
    hf: tuple[str, str, str]

    def to_ours(self, tensors: Sequence[torch.Tensor], model: ModelConfig) -> torch.Tensor:
        groups, dim = model.num_query_groups, model.kv_channels
        q, k, v = tensors
        hidden = q.shape[-1]
        parts = (q.reshape(groups, -1, hidden), k.reshape(groups, dim, hidden), v.reshape(groups, dim, hidden))
        return torch.cat(parts, dim=1).reshape(-1, hidden)

    def to_hf(self, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
        groups, dim = model.num_query_groups, model.kv_channels
        per_group = model.num_attention_heads // groups * dim
        hidden = tensor.shape[-1]
        q, k, v = tensor.reshape(groups, per_group + 2 * dim, hidden).split([per_group, dim, dim], dim=1)
        return [t.reshape(-1, hidden) for t in (q, k, v)]


@dataclass(frozen=True)
class StackedExperts:
    ours: str
    hf_name: str
    shape: tuple[int, int, int]
    """Our (and transformers 5's) shape: [experts, out features, in features]."""

    @property
    def hf(self) -> tuple[str, ...]:
        return (self.hf_name,)

    def to_ours(self, tensors: Sequence[torch.Tensor], model: ModelConfig) -> torch.Tensor:
        (tensor,) = tensors
        if tuple(tensor.shape) != self.shape and tuple(tensor.shape) == (self.shape[0], self.shape[2], self.shape[1]):
            tensor = tensor.transpose(1, 2)
        return tensor

    def to_hf(self, tensor: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
        return [tensor]


Entry = Plain | FusedQKV | StackedExperts


def mapping(model: ModelConfig) -> list[Entry]:
    """Every tensor of the model, in a stable order (vision tower, embedding, layers, final norm, output)."""
    entries: list[Entry] = [Plain(f"vision.{name}", f"{HF_VISION}{name}") for name in vision_param_shapes(model)]
    entries.append(Plain("language_model.embedding.word_embeddings.weight", f"{HF_TEXT}embed_tokens.weight"))
    experts, ffn, hidden = model.num_moe_experts, model.moe_ffn_hidden_size, model.hidden_size
    for i in range(model.num_layers):
        ours, hf = f"language_model.decoder.layers.{i}.", f"{HF_TEXT}layers.{i}."
        entries += [
            Plain(f"{ours}input_layernorm.weight", f"{hf}input_layernorm.weight"),
            FusedQKV(f"{ours}self_attention.linear_qkv.weight", tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv")),
            Plain(f"{ours}self_attention.q_layernorm.weight", f"{hf}self_attn.q_norm.weight"),
            Plain(f"{ours}self_attention.k_layernorm.weight", f"{hf}self_attn.k_norm.weight"),
            Plain(f"{ours}self_attention.linear_proj.weight", f"{hf}self_attn.o_proj.weight"),
            Plain(f"{ours}pre_mlp_layernorm.weight", f"{hf}post_attention_layernorm.weight"),
            Plain(f"{ours}mlp.router.weight", f"{hf}mlp.gate.weight"),
            StackedExperts(
                f"{ours}mlp.experts.gate_up_proj", f"{hf}mlp.experts.gate_up_proj", (experts, 2 * ffn, hidden)
            ),
            StackedExperts(f"{ours}mlp.experts.down_proj", f"{hf}mlp.experts.down_proj", (experts, hidden, ffn)),
        ]
    entries.append(Plain("language_model.decoder.final_layernorm.weight", f"{HF_TEXT}norm.weight"))
    if model.untie_embeddings_and_output_weights:
        entries.append(Plain("language_model.output_layer.weight", "lm_head.weight"))
    return entries
