"""`LocalTokenDispatcher` puts the routed tokens in Megatron-Core's order and adds the expert outputs back as
Megatron-Core's permute/unpermute do, with their gradients, and the model uses it when it holds every expert; the
experts then gather their input again in the backward pass instead of keeping it, with the same gradients."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection, permute, unpermute
from vlm_fsdp.model.dispatch import LocalTokenDispatcher
from vlm_fsdp.model.experts import GroupedExperts
from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe
from vlm_fsdp.model.transformer_config import transformer_config
from vlm_fsdp.train.parallel import init_distributed, shutdown

from .parity import cpu_config


@pytest.fixture(scope="module")
def tc():
    config = cpu_config()
    init_distributed(config)
    yield transformer_config(config.model, on_meta_device=False)
    shutdown()


def test_dispatch_and_combine_equal_megatron_permute_and_unpermute(tc):
    torch.manual_seed(0)
    seq, batch, hidden, experts, topk = 23, 2, tc.hidden_size, tc.num_moe_experts, tc.moe_router_topk
    logits = torch.randn(seq * batch, experts)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(topk, dim=1).indices, True)
    probs = torch.softmax(logits, dim=-1) * routing_map
    states = torch.randn(seq, batch, hidden)

    dispatcher = LocalTokenDispatcher(tc, pg_collection=get_default_pg_collection())
    tokens, token_probs = dispatcher.token_dispatch(*dispatcher.dispatch_preprocess(states, routing_map, probs))
    tokens, per_expert, token_probs = dispatcher.dispatch_postprocess(tokens, token_probs)
    expected, expected_probs, index = permute(
        states.view(-1, hidden), routing_map, probs=probs, num_out_tokens=seq * batch * topk
    )
    assert torch.equal(tokens, expected) and torch.equal(token_probs, expected_probs)
    assert per_expert.tolist() == routing_map.sum(dim=0).tolist()
    assert sum(per_expert.tolist()) == seq * batch * topk

    outputs = torch.randn_like(tokens)
    combined = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(outputs)))
    restored = unpermute(outputs, index, restore_shape=torch.Size([seq * batch, hidden]), routing_map=routing_map)
    assert combined.shape == states.shape
    torch.testing.assert_close(combined.view(-1, hidden), restored, rtol=0, atol=1e-6)


def test_the_gradients_through_dispatch_and_combine_are_megatrons(tc):
    """The gradients come from gathers, not from index_select's and scatter_add_'s atomic additions; they are the
    ones autograd gives through Megatron-Core's permute and unpermute, for the tokens and for the routing weights."""
    torch.manual_seed(1)
    tokens, hidden, experts, topk = 37, tc.hidden_size, tc.num_moe_experts, tc.moe_router_topk
    logits = torch.randn(tokens, experts)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(topk, dim=1).indices, True)
    scores = torch.softmax(logits, dim=-1)
    weight = torch.randn(hidden, hidden)
    upstream = torch.randn(tokens, 1, hidden)

    def gradients(route) -> tuple[torch.Tensor, torch.Tensor]:
        probs = scores.clone().requires_grad_()
        states = torch.linspace(-1, 1, tokens * hidden).view(tokens, 1, hidden).requires_grad_()
        out = route(states, probs * routing_map)
        (out * upstream).sum().backward()
        return states.grad, probs.grad

    def ours(states, probs):
        dispatcher = LocalTokenDispatcher(tc, pg_collection=get_default_pg_collection())
        routed, routed_probs = dispatcher.dispatch_preprocess(states, routing_map, probs)
        return dispatcher.combine_postprocess(torch.tanh(routed @ weight) * routed_probs.unsqueeze(-1))

    def megatrons(states, probs):
        routed, routed_probs, index = permute(
            states.view(-1, hidden), routing_map, probs=probs, num_out_tokens=tokens * topk
        )
        out = torch.tanh(routed @ weight) * routed_probs.unsqueeze(-1)
        return unpermute(out, index, restore_shape=torch.Size([tokens, hidden]), routing_map=routing_map).view(
            tokens, 1, hidden
        )

    for got, expected in zip(gradients(ours), gradients(megatrons), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert expected.abs().max() > 0.1


def test_model_dispatches_locally_without_expert_parallelism(tc):
    config = cpu_config()
    model = Qwen3VLMoe(tc, config.model, torch.device("cpu"), vision_without_images=False)
    dispatchers = [layer.mlp.token_dispatcher for layer in model.language_model.decoder.layers]
    assert dispatchers and all(isinstance(d, LocalTokenDispatcher) for d in dispatchers)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


def _through_experts(tc, experts, device: str, *, regather: bool, seed: int = 2):
    """(output, gradients of the states, the routing weights and both expert weights, whether the routed tokens
    were kept for the backward pass) of 29 bf16 tokens through dispatch, `experts` and combine."""
    generator = torch.Generator().manual_seed(seed)
    tokens, hidden, topk = 29, tc.hidden_size, tc.moe_router_topk
    logits = torch.randn(tokens, tc.num_moe_experts, generator=generator).to(device)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(topk, dim=1).indices, True)
    states = torch.randn(tokens, 1, hidden, generator=generator).bfloat16().to(device).requires_grad_()
    scores = torch.softmax(logits, dim=-1).requires_grad_()
    upstream = torch.randn(tokens, 1, hidden, generator=generator).to(device)

    dispatcher = LocalTokenDispatcher(tc, pg_collection=get_default_pg_collection())
    saved = []
    keep = lambda t: saved.append(t.untyped_storage().data_ptr()) or t  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        routed, probs = dispatcher.dispatch_preprocess(states, routing_map, scores * routing_map)
        source, index = dispatcher.gathered_from if regather else (None, None)
        out, _ = experts(routed, dispatcher.tokens_per_expert, probs, source, index)
        combined = dispatcher.combine_postprocess(out)
    (combined.float() * upstream).sum().backward()
    grads = [states.grad, scores.grad] + [p.grad.clone() for p in (experts.gate_up_proj, experts.down_proj)]
    experts.zero_grad()
    return combined, grads, routed.untyped_storage().data_ptr() in saved


@pytest.mark.parametrize("device", DEVICES)
def test_the_experts_gather_their_input_again_with_the_same_gradients(tc, device):
    """Through `LocalTokenDispatcher` the experts keep the layer's input and the gather index for the backward pass
    instead of the top-k routed copies, and gather again there: outputs and gradients are bitwise the same."""
    experts = GroupedExperts(tc.num_moe_experts, tc).bfloat16().to(device)
    kept_out, kept_grads, kept = _through_experts(tc, experts, device, regather=False)
    out, grads, routed_kept = _through_experts(tc, experts, device, regather=True)
    assert kept and not routed_kept
    assert torch.equal(out, kept_out)
    for got, expected in zip(grads, kept_grads, strict=True):
        assert torch.equal(got, expected) and expected.abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_experts_gather_again_as_eager_ones_do(tc, device, monkeypatch):
    """Dynamo and AOTAutograd trace the gather-again backward pass: on the CPU with the backend that keeps the
    traced operations (bitwise the eager results), on the GPU with Inductor as `train.compile` runs it (fused
    elementwise work rounds once, so to bf16 precision)."""
    experts = GroupedExperts(tc.num_moe_experts, tc).bfloat16().to(device)
    out, grads, _ = _through_experts(tc, experts, device, regather=True, seed=3)
    backend = "inductor" if device == "cuda" else "aot_eager"
    monkeypatch.setattr(experts, "forward", torch.compile(experts.forward, dynamic=True, backend=backend))
    torch._dynamo.reset()
    compiled_out, compiled_grads, routed_kept = _through_experts(tc, experts, device, regather=True, seed=3)
    assert not routed_kept
    bound = {"rtol": 2e-2, "atol": 2e-2} if device == "cuda" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(compiled_out, out, **bound)
    for got, expected in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(got, expected, **bound)
