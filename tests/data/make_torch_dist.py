"""Write the small Megatron `torch_dist` checkpoint under torch_dist_tiny/ with megatron-core's own
dist_checkpointing, from a megatron-core GPTModel (local spec, 3 MoE layers) of the conversion tests' shape.

    uv run python -m tests.data.make_torch_dist

megatron-core's save path calls CUDA for a stream sync and a status all-reduce only; on a CPU-only machine those
two calls are pointed at the CPU so that the checkpoint can be written with gloo.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

OUT = Path(__file__).parent / "torch_dist_tiny"
# the conversion tests' shape: odd widths, one key/value head, six experts, three DeepStack-fed vision blocks
ODD = [
    "model.hidden_size=200",
    "model.num_attention_heads=5",
    "model.num_query_groups=1",
    "model.kv_channels=40",
    "model.mrope_section=[8, 6, 6]",
    "model.num_moe_experts=6",
    "model.moe_ffn_hidden_size=56",
    "model.moe_router_topk=2",
    "model.num_layers=3",
    "model.ffn_hidden_size=300",
    "model.vision.depth=3",
    "model.vision.hidden_size=72",
    "model.vision.num_heads=3",
    "model.vision.intermediate_size=100",
    "model.vision.deepstack_visual_indexes=[0, 2]",
    "model.vision.num_position_embeddings=256",
]
# the conversion tests' model, with a small vocabulary so the fixture stays small
OVERRIDES = ["model.vocab_size=1024", "model.image_token_id=1012", "model.video_token_id=1013",
             "model.vision_start_token_id=1009", "model.vision_end_token_id=1010"]  # fmt: skip


def main() -> None:
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from vlm_fsdp.config import load_config
    from vlm_fsdp.model.transformer_config import transformer_config
    from vlm_fsdp.train.parallel import free_port

    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    model = load_config("tiny", overrides=[*ODD, *OVERRIDES, "model.moe_token_dispatcher_type=allgather"]).model
    config = transformer_config(model, on_meta_device=False)
    torch.manual_seed(0)
    spec = get_gpt_layer_local_spec(num_experts=model.num_moe_experts, qk_layernorm=True, normalization="RMSNorm")
    gpt = GPTModel(config, spec, vocab_size=model.vocab_size, max_sequence_length=model.max_position_embeddings,
                   position_embedding_type="none")  # fmt: skip
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    os.chdir(OUT.parent)  # DCP records the path it was given; keep it relative
    dist_checkpointing.save(gpt.sharded_state_dict(), OUT.name)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
