"""Hugging Face safetensors -> a model-only fsdp_dtensor (DCP) checkpoint, streamed one mapping entry at a time
(see `vlm_fsdp.checkpoint.streaming`).

Nothing is converted until the whole directory agrees with itself: `config.json` must describe a Qwen3-VL-MoE
model, and every tensor the mapping reads must have the dtype and shape that config gives it, with none left over.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from vlm_fsdp.checkpoint.layout import is_complete, iteration_dir
from vlm_fsdp.checkpoint.streaming import write_streaming
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.config.overrides import apply_mapping, to_dict
from vlm_fsdp.config.run import Config
from vlm_fsdp.errors import ConfigError, UserError
from vlm_fsdp.model.hf_config import architecture_mismatches, model_fields_from_hf
from vlm_fsdp.model.hf_mapping import Entry, FusedQKV, StackedExperts, mapping
from vlm_fsdp.plan.params import vision_param_shapes

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
WEIGHT_DTYPES = frozenset(SAFETENSORS_DTYPES.values())
MODEL_TYPE = "qwen3_vl_moe"
INDEX = "model.safetensors.index.json"
# text_config settings of Qwen3-VL-MoE that vlm-fsdp's model implements only at these values
IMPLEMENTED = {"mlp_only_layers": [], "decoder_sparse_step": 1, "attention_bias": False, "hidden_act": "silu",
               "norm_topk_prob": True}  # fmt: skip
Shape = tuple[int, ...]


# --- config.json ----------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """The `config.json` of a Hugging Face Qwen3-VL-MoE directory; anything else is refused with the reason."""
    config_json = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory: expected a Hugging Face Qwen3-VL-MoE model directory")
    if not config_json.is_file():
        raise UserError(f"{hf_dir} has no config.json: expected a Hugging Face Qwen3-VL-MoE model directory")
    try:
        config = json.loads(config_json.read_bytes())
    except (OSError, ValueError) as err:
        raise UserError(f"{config_json} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_json} holds a JSON {type(config).__name__}, not a model config")
    if config.get("model_type") != MODEL_TYPE:
        raise UserError(
            f"{config_json} describes a {str(config.get('model_type'))[:60]!r} model "
            f"({str(config.get('architectures'))[:100]}): vlm-fsdp converts Qwen3-VL-MoE models "
            f"(model_type {MODEL_TYPE!r}) only"
        )
    return config


def _model_fields(config: dict[str, Any], hf_dir: Path) -> dict[str, Any]:
    text = config.get("text_config")
    for key, value in IMPLEMENTED.items():
        if isinstance(text, dict) and key in text and text[key] != value:
            raise UserError(f"{hf_dir / 'config.json'} sets text_config.{key} to {str(text[key])[:60]}: vlm-fsdp "
                            f"implements Qwen3-VL-MoE with {key}={value!r} only")  # fmt: skip
    try:
        return model_fields_from_hf(config)
    except KeyError as err:
        raise UserError(
            f"{hf_dir / 'config.json'} lacks {err.args[0]!r}, which every Qwen3-VL-MoE config has"
        ) from None
    except (TypeError, AttributeError, ValueError, ArithmeticError) as err:
        raise UserError(f"{hf_dir / 'config.json'} holds an invalid value ({err})") from None


def model_from_hf(hf_dir: Path) -> ModelConfig:
    """The architecture a Hugging Face directory's `config.json` describes."""
    config = Config()
    try:
        apply_mapping(config, {"model": _model_fields(read_hf_config(hf_dir), hf_dir)})
    except ConfigError as err:
        raise UserError(f"{hf_dir / 'config.json'}: {err}") from None
    problem = architecture_problem(config.model)
    if problem:
        raise UserError(f"{hf_dir / 'config.json'}: {problem}")
    return config.model


def architecture_problem(model: ModelConfig) -> str | None:
    """Why tensors of this architecture cannot be mapped, or None."""
    if model.num_attention_heads % model.num_query_groups:
        return (f"the {model.num_query_groups} key/value heads do not divide the {model.num_attention_heads} "
                "attention heads")  # fmt: skip
    return None


def check_architecture(hf_dir: Path, model: ModelConfig) -> None:
    config = read_hf_config(hf_dir)
    _model_fields(config, hf_dir)
    mismatches = architecture_mismatches(model, config)
    if mismatches:
        raise UserError(f"{hf_dir} holds another architecture than the config (ours != theirs):\n  "
                        + "\n  ".join(mismatches))  # fmt: skip


# --- the shapes a config gives every tensor -------------------------------------------------------------------


def model_tensor_shapes(model: ModelConfig) -> dict[str, Shape]:
    """Our name (as in `mapping`) -> the shape of that tensor in a model of this architecture."""
    h, kv, heads, groups = model.hidden_size, model.kv_channels, model.num_attention_heads, model.num_query_groups
    experts, ffn = model.num_moe_experts, model.moe_ffn_hidden_size
    shapes = {f"vision.{name}": shape for name, shape in vision_param_shapes(model).items()}
    shapes["language_model.embedding.word_embeddings.weight"] = (model.vocab_size, h)
    for i in range(model.num_layers):
        layer = f"language_model.decoder.layers.{i}."
        shapes |= {
            f"{layer}input_layernorm.weight": (h,),
            f"{layer}self_attention.linear_qkv.weight": ((heads + 2 * groups) * kv, h),
            f"{layer}self_attention.q_layernorm.weight": (kv,),
            f"{layer}self_attention.k_layernorm.weight": (kv,),
            f"{layer}self_attention.linear_proj.weight": (h, heads * kv),
            f"{layer}pre_mlp_layernorm.weight": (h,),
            f"{layer}mlp.router.weight": (experts, h),
            f"{layer}mlp.experts.gate_up_proj": (experts, 2 * ffn, h),
            f"{layer}mlp.experts.down_proj": (experts, h, ffn),
        }
    shapes["language_model.decoder.final_layernorm.weight"] = (h,)
    if model.untie_embeddings_and_output_weights:
        shapes["language_model.output_layer.weight"] = (model.vocab_size, h)
    return shapes


def _hf_shapes(entry: Entry, ours: Shape, model: ModelConfig) -> list[set[Shape]]:
    """The shapes each Hugging Face tensor of `entry` may have."""
    if isinstance(entry, FusedQKV):
        q = (model.num_attention_heads * model.kv_channels, ours[1])
        kv = (model.num_query_groups * model.kv_channels, ours[1])
        return [{q}, {kv}, {kv}]
    if isinstance(entry, StackedExperts):
        return [{ours, (ours[0], ours[2], ours[1])}]  # ours, or the layout published for transformers 4
    return [{ours}]


def checkpoint_tensor_problems(metadata: Metadata, model: ModelConfig) -> list[str]:
    """How the `model.*` tensors of a checkpoint differ from what the architecture needs."""
    entries = metadata.state_dict_metadata
    absent, problems = [], []
    for name, shape in model_tensor_shapes(model).items():
        key, meta = f"model.{name}", entries.get(f"model.{name}")
        if meta is None:
            absent.append(key)
        elif not isinstance(meta, TensorStorageMetadata):
            problems.append(f"{key} is stored as an object, not as a tensor")
        elif tuple(meta.size) != shape:
            problems.append(f"{key} has shape {list(meta.size)}, but the config needs {list(shape)}")
        elif meta.properties.dtype not in WEIGHT_DTYPES:
            problems.append(f"{key} has dtype {meta.properties.dtype}, not bfloat16, float16 or float32")
    if absent:
        problems.insert(0, f"{len(absent)} model tensors the config needs are absent, e.g. {absent[:3]}")
    return problems


# --- safetensors ----------------------------------------------------------------------------------------------


def _plain_file_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _safetensors_files(directory: Path) -> list[str]:
    index = directory / INDEX
    if not index.is_file():
        files = [p.name for p in sorted(directory.glob("*.safetensors"))]
        if not files:
            raise UserError(f"{directory} has no *.safetensors files: expected a Hugging Face model directory")
        return files
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{index} is damaged: it is not a JSON index with a weight_map ({err})") from None
    if not isinstance(weight_map, dict) or not weight_map or not all(map(_plain_file_name, weight_map.values())):
        raise UserError(f"{index} is damaged: its weight_map must name safetensors files of {directory}")
    return sorted(set(weight_map.values()))


class HfCheckpoint:
    """Lazy access to the tensors of a Hugging Face model directory (one or many safetensors files)."""

    def __init__(self, directory: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.handles: dict[str, Any] = {}
        self.files: dict[str, Path] = {}
        for name in _safetensors_files(directory):
            path = directory / name
            if not path.is_file():
                raise UserError(f"{path} is missing ({INDEX} names it)")
            try:
                handle = stack.enter_context(safe_open(path, framework="pt"))
            except Exception as err:  # safetensors raises its own error type, and OSError
                raise UserError(f"{path} is not a readable safetensors file (truncated or damaged?): {err}") from None
            self.handles |= dict.fromkeys(handle.keys(), handle)
            self.files |= dict.fromkeys(handle.keys(), path)

    def meta(self, name: str) -> torch.Tensor:
        try:
            tensor_slice = self._handle(name).get_slice(name)
            dtype, shape = tensor_slice.get_dtype(), tensor_slice.get_shape()
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"cannot read {name} from {self.files[name]}: {err}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"{name} in {self.files[name]} has dtype {dtype}: vlm-fsdp converts "
                            f"{', '.join(SAFETENSORS_DTYPES)} weights only")  # fmt: skip
        return torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta")

    def load(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"cannot read {name} from {self.files[name]} (truncated or damaged?): {err}") from None

    def _handle(self, name: str):
        if name not in self.handles:
            raise UserError(f"the Hugging Face checkpoint has no tensor {name}: is it a Qwen3-VL-MoE model of this "
                            "architecture?")  # fmt: skip
        return self.handles[name]


def _checked_metas(hf: HfCheckpoint, entry: Entry, ours: Shape, model: ModelConfig) -> list[torch.Tensor]:
    metas = [hf.meta(name) for name in entry.hf]
    for name, meta, allowed in zip(entry.hf, metas, _hf_shapes(entry, ours, model), strict=True):
        if tuple(meta.shape) not in allowed:
            wanted = " or ".join(str(list(s)) for s in sorted(allowed))
            raise UserError(f"{name} in {hf.files[name]} has shape {list(meta.shape)}, but config.json needs "
                            f"{wanted}: the weights and the config describe different models")  # fmt: skip
    return metas


def hf_tensors(hf: HfCheckpoint, entries: list[Entry], model: ModelConfig) -> dict:
    """Our name -> (meta tensor, producer) for these mapping entries, after checking every source tensor's dtype
    and shape against the architecture."""
    shapes = model_tensor_shapes(model)
    tensors = {}
    for entry in entries:
        meta = entry.to_ours(_checked_metas(hf, entry, shapes[entry.ours], model), model)

        def produce(entry=entry, dtype=meta.dtype):
            return entry.to_ours([hf.load(n) for n in entry.hf], model).to(dtype).contiguous()

        tensors[entry.ours] = (meta, produce)
    return tensors


def _refuse_unused(hf: HfCheckpoint, entries: list[Entry], model: ModelConfig) -> None:
    used = {name for entry in entries for name in entry.hf}
    if not model.untie_embeddings_and_output_weights:
        used.add("lm_head.weight")  # a copy of the tied embedding some exporters keep
    unused = sorted(set(hf.handles) - used)
    if unused:
        raise UserError(
            f"the safetensors hold {len(unused)} tensors config.json does not account for, e.g. {unused[:3]}: the "
            "weights and the config describe different models (more layers, experts or vision blocks?)"
        )


def write_model_checkpoint(hf_dir: Path, out: Path, model: ModelConfig, *, point_latest: bool = True) -> Path:
    """Convert `hf_dir` into a model-only checkpoint at `out`."""
    check_architecture(hf_dir, model)
    record = {"model": to_dict(model), "source": {"hf_path": str(hf_dir.resolve())}}
    with ExitStack() as stack:
        hf = HfCheckpoint(hf_dir, stack)
        entries = mapping(model)
        tensors = hf_tensors(hf, entries, model)
        _refuse_unused(hf, entries, model)
        return write_streaming(out, tensors, record, point_latest=point_latest)


def import_hf(hf_dir: Path, work_dir: Path, model: ModelConfig, dist) -> Path:
    """The model-only checkpoint of `hf_dir` for this run, converted once by the main rank (its error, if any,
    raised on every rank)."""
    from vlm_fsdp.checkpoint.parallel_io import agree

    out = iteration_dir(work_dir, 0)
    error = None
    if dist.is_main and not is_complete(out):
        try:
            write_model_checkpoint(hf_dir, out, model)
        except UserError as err:
            error = str(err)
    agree(error)
    return out
