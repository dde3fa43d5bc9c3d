"""The one FLOP formula used by `plan`, the step log's TFLOP/s and MFU, and `bench`.

Counted: every matrix multiply of the forward pass, at 2 FLOPs per multiply-add; training is 3x the forward
pass (the backward pass computes input and weight gradients: 2x). Not counted: norms, activations, softmax,
rotary embeddings, the router's top-k, embedding lookups (all memory-bound, a few percent of the time).

- Language decoder, per token: Q/K/V/O projections, the router, and the top-k experts' SwiGLU MLPs of every
  layer.
- Output layer, per labelled token (one whose next token is a loss target): training needs the logits of those
  tokens only, and vlm-fsdp computes no others (`vlm_fsdp.model.linear_loss`). Megatron-Core's and PaLM's
  formulas count it on every token; on supervised data, where the prompt and the image tokens carry no label,
  that counts work the step need not do (at Qwen3's vocabulary the output layer is as much as the whole
  30B-A3B decoder per token).
- Attention, per packed document of length s (packed documents never attend to each other):
  QK^T and attention x V over the pairs actually computed, s(s+1)/2 with the causal mask (or s^2 when
  `causal=False`, what an eager implementation that masks a full score matrix multiplies).
- Vision tower, per actual patch: the patch embedding, each block's QKV/output/MLP, and bidirectional
  attention over the patches of the same image (n^2 per image of n patches); the patch merger and DeepStack
  mergers per merged token (one per spatial_merge_size^2 patches).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vlm_fsdp.config.model import ModelConfig


def text_token_flops(m: ModelConfig) -> int:
    """Forward FLOPs of one token through the decoder layers' weights (no attention scores, no output layer)."""
    q = m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    attention = m.hidden_size * (q + 2 * kv) + q * m.hidden_size
    router = m.hidden_size * m.num_moe_experts
    experts = m.moe_router_topk * 3 * m.hidden_size * m.moe_ffn_hidden_size
    return 2 * m.num_layers * (attention + router + experts)


def output_token_flops(m: ModelConfig) -> int:
    """Forward FLOPs of the output layer for one labelled token."""
    return 2 * m.hidden_size * m.vocab_size


def attention_flops(m: ModelConfig, doc_length: int, *, causal: bool = True) -> int:
    """Forward FLOPs of the attention scores and weighted sum of one document, over all decoder layers."""
    pairs = doc_length * (doc_length + 1) // 2 if causal else doc_length * doc_length
    return m.num_layers * 2 * 2 * m.num_attention_heads * m.kv_channels * pairs


def text_forward_flops(m: ModelConfig, doc_lengths: Iterable[int], *, labelled_tokens: int, causal: bool = True) -> int:
    """Forward FLOPs of the decoder over packed documents of these lengths, and of the output layer over
    `labelled_tokens` of their tokens."""
    lengths = list(doc_lengths)
    attention = sum(attention_flops(m, s, causal=causal) for s in lengths)
    return sum(lengths) * text_token_flops(m) + attention + labelled_tokens * output_token_flops(m)


def vision_patch_flops(m: ModelConfig) -> int:
    """Forward FLOPs of one patch through the vision tower's weights (no attention scores), mergers included."""
    v = m.vision
    h, i = v.hidden_size, v.intermediate_size
    embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * h
    block = h * 3 * h + h * h + 2 * h * i
    merged = h * v.spatial_merge_size**2
    mergers = (1 + len(v.deepstack_visual_indexes)) * (merged * merged + merged * m.hidden_size)
    return 2 * (embed + v.depth * block) + 2 * mergers // v.spatial_merge_size**2


def vision_forward_flops(m: ModelConfig, image_patches: Iterable[int]) -> int:
    """Forward FLOPs of the vision tower over images with these patch counts (t x h x w of each grid)."""
    v = m.vision
    total = 0
    for n in image_patches:
        total += n * vision_patch_flops(m) + v.depth * 2 * 2 * v.hidden_size * n * n
    return total


def training_flops(
    m: ModelConfig,
    doc_lengths: Sequence[int],
    image_patches: Sequence[int] = (),
    *,
    labelled_tokens: int,
    causal: bool = True,
) -> int:
    """FLOPs of one forward and backward pass over a packed sequence with `labelled_tokens` loss targets, and its
    images."""
    text = text_forward_flops(m, doc_lengths, labelled_tokens=labelled_tokens, causal=causal)
    return 3 * (text + vision_forward_flops(m, image_patches))
