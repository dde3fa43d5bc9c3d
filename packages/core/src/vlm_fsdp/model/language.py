"""The language decoder: Megatron-Core's GPTModel with Qwen3-MoE layers, interleaved mRoPE and DeepStack.

Design choices:
- Layer spec: Megatron-Core's TransformerLayer, SelfAttention and MoELayer (router, token dispatcher, aux loss)
  with our `PackedAttention` (flash varlen) as core attention and `GroupedExperts` (grouped GEMM) as experts;
  no Transformer Engine needed. Without expert parallelism the MoE layer dispatches through `LocalTokenDispatcher`,
  which never synchronises with the host.
- Positions: `position_embedding_type="none"` and `_preprocess` supplies interleaved mRoPE angles computed from
  the `[3, batch, seq]` position ids (Megatron-Core's own mRoPE is the sectioned Qwen2-VL variant).
- Packed samples: the cumulative sequence lengths travel in the `attention_mask` argument to `PackedAttention`.
- Loss: given `Targets` as its labels, the output layer computes the cross-entropy chunk by chunk over the tokens
  that have a label (`linear_loss.py`), never the whole microbatch's logits.
- DeepStack: forward hooks on the first decoder layers add the vision features of DeepStack level i to the
  output of layer i at image-token positions (they also run when a layer is recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.model import compat  # noqa: F401  (patches megatron-core before layers are built)
from vlm_fsdp.model.attention import PackedAttention
from vlm_fsdp.model.dispatch import MoE
from vlm_fsdp.model.experts import GroupedExperts
from vlm_fsdp.model.layers import ColumnLinear, OutputLayer, Router, RowLinear, make_resettable
from vlm_fsdp.model.rope import mrope_frequencies


def decoder_layer_spec() -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnLinear,
                    core_attention=PackedAttention,
                    linear_proj=RowLinear,
                    q_layernorm=WrappedTorchNorm,
                    k_layernorm=WrappedTorchNorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MoE, submodules=MoESubmodules(experts=GroupedExperts, router=Router)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


@dataclass(frozen=True)
class Targets:
    """What the loss is computed against; `LanguageModel.forward` takes it as its `labels`."""

    labels: torch.Tensor
    """[batch, seq] int64, -100 where there is no loss."""
    count: int
    """The number of labels that are not -100 (known on the host, so finding them does not wait for the GPU)."""


class LanguageModel(GPTModel):
    """Qwen3-VL-MoE text decoder; `forward` returns the per-token loss `[batch, seq]` when given `Targets` as its
    labels."""

    def __init__(self, config: TransformerConfig, model: ModelConfig) -> None:
        super().__init__(
            config,
            decoder_layer_spec(),
            vocab_size=model.vocab_size,
            max_sequence_length=model.max_position_embeddings,
            position_embedding_type="none",
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        )
        # Megatron-Core builds its PyTorch norms in fp32 whatever params_dtype is: with bf16 activations every
        # RMSNorm would then take torch's unfused path (input and weight dtypes differ); Megatron's own bf16 models
        # are cast whole (Float16Module), norms included
        for module in self.modules():
            if isinstance(module, torch.nn.RMSNorm):
                module.to(config.params_dtype)
        self.rotary_base = model.rotary_base
        self.mrope_section = list(model.mrope_section)
        make_resettable(self.embedding.word_embeddings, config.init_method)
        self.output_layer.__class__ = OutputLayer  # GPTModel builds the layer; ours only adds the `labels` path
        make_resettable(self.output_layer, config.init_method)
        self.deepstack: tuple[tuple[torch.Tensor, torch.Tensor], list[torch.Tensor]] | None = None
        for index, layer in enumerate(self.decoder.layers):
            layer.register_forward_hook(self._deepstack_hook(index))

    def _preprocess(self, *args, position_ids=None, **kwargs):
        out = list(super()._preprocess(*args, position_ids=None, **kwargs))
        out[1] = mrope_frequencies(
            position_ids, head_dim=self.config.kv_channels, base=self.rotary_base, section=self.mrope_section
        )
        return tuple(out)

    def _postprocess(self, hidden_states, labels: Targets | None = None, **kwargs):
        if labels is None:
            return super()._postprocess(hidden_states, labels=None, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        # [seq, batch] like the states
        loss, _ = self.output_layer(hidden_states, weight=weight, labels=labels.labels.t(), count=labels.count)
        return loss.t()

    def _deepstack_hook(self, index: int):
        def add_features(module, inputs, output):
            if self.deepstack is None or index >= len(self.deepstack[1]):
                return output
            (batch_index, seq_index), features = self.deepstack
            hidden, context = output
            positions = (seq_index, batch_index)
            hidden = hidden.index_put(positions, hidden[positions] + features[index].to(hidden.dtype))
            return hidden, context

        return add_features
