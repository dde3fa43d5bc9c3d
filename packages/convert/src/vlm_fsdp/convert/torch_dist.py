"""Megatron `torch_dist` checkpoint -> model-only fsdp_dtensor checkpoint, for runs moving to Megatron-FSDP.

`torch_dist` (Megatron-Core's dist_checkpointing on PyTorch DCP) stacks every per-layer tensor along a leading
layer axis (`decoder.layers.self_attention.linear_qkv.weight` is `[layers, ...]`, experts `[layers, experts, out,
in]`) and, as Transformer Engine layers do, names the input norm `linear_qkv.layer_norm_weight` and the MoE norm
`mlp.linear_fc1.layer_norm_weight`. The language decoder here is the same Megatron-Core GPTModel, so its tensors
map one to one; each layer's slice is read on its own. The vision tower of 3D-parallel runs differs between
frameworks, so it is taken from a Hugging Face directory of the same model (`--hf`).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from vlm_fsdp.checkpoint.hf_import import (
    WEIGHT_DTYPES,
    HfCheckpoint,
    check_architecture,
    hf_tensors,
    model_tensor_shapes,
)
from vlm_fsdp.checkpoint.layout import check_new_output
from vlm_fsdp.checkpoint.safe_reader import TensorLoadPlanner, load_tensors, read_metadata, storage_problems
from vlm_fsdp.checkpoint.streaming import write_streaming
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.config.overrides import to_dict
from vlm_fsdp.errors import UserError
from vlm_fsdp.model.hf_mapping import Plain, mapping

# our per-layer name -> Megatron's layer-stacked names, first match wins
LAYER_TENSORS = {
    "input_layernorm.weight": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "self_attention.linear_qkv.weight": ("self_attention.linear_qkv.weight",),
    "self_attention.q_layernorm.weight": ("self_attention.q_layernorm.weight",),
    "self_attention.k_layernorm.weight": ("self_attention.k_layernorm.weight",),
    "self_attention.linear_proj.weight": ("self_attention.linear_proj.weight",),
    "pre_mlp_layernorm.weight": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    "mlp.router.weight": ("mlp.router.weight",),
    "mlp.experts.gate_up_proj": ("mlp.experts.experts.linear_fc1.weight",),
    "mlp.experts.down_proj": ("mlp.experts.experts.linear_fc2.weight",),
}
GLOBAL_TENSORS = ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight")


class _SlicePlanner(TensorLoadPlanner):
    """Reads `target` from the region of a saved tensor starting at `offsets`."""

    def __init__(self, fqn: str, offsets: tuple[int, ...]) -> None:
        super().__init__()
        self.fqn, self.offsets = fqn, offsets

    def create_local_plan(self) -> LoadPlan:
        target = self.state_dict[self.fqn]
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=target.shape)
        metadata = self.metadata.state_dict_metadata[self.fqn]
        return LoadPlan(create_read_items_for_chunk_list(self.fqn, metadata, [chunk]))

    def resolve_tensor(self, read_item):
        target = self.state_dict[self.fqn]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            target = target.narrow(dim, offset, length)
        return target


def _read_slice(checkpoint: Path, metadata: Metadata, fqn: str, layer: int | None) -> torch.Tensor:
    meta = metadata.state_dict_metadata[fqn]
    shape = tuple(meta.size) if layer is None else (1, *meta.size[1:])
    target = torch.empty(shape, dtype=meta.properties.dtype)
    offsets = (0,) * len(shape) if layer is None else (layer, *(0,) * (len(shape) - 1))
    load_tensors({fqn: target}, checkpoint, metadata=metadata, planner=_SlicePlanner(fqn, offsets), no_dist=True)
    return target if layer is None else target[0]


def _source_shape(checkpoint: Path, fqn: str, meta: object, layer: int | None, model: ModelConfig) -> tuple:
    """The shape of one layer's slice (or the whole tensor) of `fqn`, after checking that it is a stacked tensor
    of the config's layers and of a supported dtype."""
    if not isinstance(meta, TensorStorageMetadata):
        raise UserError(f"{checkpoint}: {fqn} is stored as an object, not as a tensor")
    if meta.properties.dtype not in WEIGHT_DTYPES:
        raise UserError(f"{checkpoint}: {fqn} has dtype {meta.properties.dtype}, not bfloat16, float16 or float32")
    if layer is None:
        return tuple(meta.size)
    layers = meta.size[0] if len(meta.size) else 0
    if layers != model.num_layers:
        raise UserError(f"{checkpoint}: {fqn} stacks {layers} layers, but the config has {model.num_layers}: pass "
                        "the recipe (and overrides) the checkpoint was trained with")  # fmt: skip
    return tuple(meta.size[1:])


def convert_torch_dist(checkpoint: Path, hf_dir: Path, out: Path, model: ModelConfig) -> Path:
    check_new_output(out)
    full_metadata = read_metadata(checkpoint)
    problems = storage_problems(checkpoint, full_metadata)
    if problems:
        raise UserError(f"{checkpoint} is damaged: {'; '.join(problems[:3])}")
    metadata = full_metadata.state_dict_metadata
    embedding = [k for k in metadata if k.endswith(GLOBAL_TENSORS[0])]
    if len(embedding) != 1:
        raise UserError(f"{checkpoint} is not a Megatron GPT torch_dist checkpoint: no single "
                        f"'{GLOBAL_TENSORS[0]}' tensor among its {len(metadata)} entries")  # fmt: skip
    prefix = embedding[0].removesuffix(GLOBAL_TENSORS[0])
    check_architecture(hf_dir, model)

    def find(names: tuple[str, ...]) -> str:
        for name in names:
            if f"{prefix}{name}" in metadata:
                return f"{prefix}{name}"
        raise UserError(f"{checkpoint} has none of {[prefix + n for n in names]}")

    tensors = {}
    sources = [(f"decoder.layers.{i}.{ours}", find(tuple(f"decoder.layers.{n}" for n in names)), i)
               for i in range(model.num_layers) for ours, names in LAYER_TENSORS.items()]  # fmt: skip
    names = GLOBAL_TENSORS if model.untie_embeddings_and_output_weights else GLOBAL_TENSORS[:2]
    sources += [(name, find((name,)), None) for name in names]
    expected = model_tensor_shapes(model)
    for ours, fqn, layer in sources:
        meta = metadata[fqn]
        shape = _source_shape(checkpoint, fqn, meta, layer, model)
        wanted = expected[f"language_model.{ours}"]
        if shape != wanted:
            raise UserError(f"{fqn} has shape {list(shape)} per layer, but the config needs {list(wanted)}: pass the "
                            "recipe (and overrides) the checkpoint was trained with")  # fmt: skip
        tensors[f"language_model.{ours}"] = (
            torch.empty(shape, dtype=meta.properties.dtype, device="meta"),
            lambda fqn=fqn, layer=layer: _read_slice(checkpoint, full_metadata, fqn, layer).contiguous(),
        )
    vision = [e for e in mapping(model) if isinstance(e, Plain) and e.ours.startswith("vision.")]
    record = {"model": to_dict(model), "source": {"torch_dist": str(checkpoint.resolve()),
                                                   "hf_path": str(hf_dir.resolve())}}  # fmt: skip
    with ExitStack() as stack:
        tensors |= hf_tensors(HfCheckpoint(hf_dir, stack), vision, model)
        return write_streaming(out, tensors, record, point_latest=False)
