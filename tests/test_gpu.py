"""GPU functional tests (`nox -s gpu`): parity with transformers in bf16, Hugging Face weights into the
Megatron-FSDP model, train + save + exact resume, a signal mid-run and a NaN step, a compiled run, pinned batches,
and the default run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vlm_fsdp.checkpoint.hf_import import import_hf
from vlm_fsdp.checkpoint.layout import finalize, latest_checkpoint
from vlm_fsdp.checkpoint.training_state import load_model, model_state
from vlm_fsdp.config import load_config
from vlm_fsdp.data.loader import build_loader
from vlm_fsdp.model.hf_mapping import mapping
from vlm_fsdp.train.build import build
from vlm_fsdp.train.loop import train
from vlm_fsdp.train.parallel import init_distributed, shutdown

from .checkpoint_tensors import model_tensors
from .parity import build_pair, compare, hf_loss_sum

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# bf16 parity bound, on the mean absolute logit difference over every token of a packed sample
MEAN_LOGIT_BOUND = 2e-2
LOSS_BOUND = 2e-2


def test_bf16_logits_and_loss_match_transformers():
    config = load_config("tiny", overrides=["model.init_model_with_meta_device=false", "data.num_workers=0"])
    init_distributed(config)
    try:
        ours, hf = build_pair(config, torch.device("cuda"))
        loader = build_loader(config)
        batches = [next(loader).to("cuda") for _ in range(2)]
        loader.close()
        rows = [r for b in batches for r in compare(ours, hf, b, config)]
    finally:
        shutdown()
    print("\nparity (bf16):", *rows, sep="\n  ")
    assert sum(r["images"] for r in rows) >= 3
    for row in rows:
        assert row["mean_abs_logit_diff"] < MEAN_LOGIT_BOUND, row
        assert abs(row["hf_loss"] - row["our_loss"]) < LOSS_BOUND, row


def test_hugging_face_weights_load_into_the_sharded_model(tmp_path):
    """The imported weights land bitwise in the sharded model, and the first training step's gradient norm
    (Megatron-FSDP, gradient accumulation over microbatches, per-token loss) equals transformers' on the same
    microbatches in bf16."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    from vlm_fsdp.model.hf_config import hf_config_dict
    from vlm_fsdp.train.loop import train_step

    config = load_config(
        "tiny",
        overrides=[f"train.output_dir={tmp_path}", "model.moe_aux_loss_coeff=0", "data.num_workers=0"],
    )
    hf = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**hf_config_dict(config.model))).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    hf_state = hf.state_dict()
    dist = init_distributed(config)
    try:
        trainable = build(config, dist.device)
        load_model(import_hf(tmp_path / "hf", tmp_path / "import", config.model, dist), trainable)
        state = model_state(trainable.wrapped)
        for entry in mapping(config.model):
            expected = entry.to_ours([hf_state[n] for n in entry.hf], config.model).float()
            loaded = state[entry.ours]
            loaded = loaded.full_tensor() if hasattr(loaded, "full_tensor") else loaded
            assert torch.equal(loaded.float().cpu().reshape(expected.shape), expected), entry.ours

        microbatches = config.train.global_batch_size // config.train.micro_batch_size
        loader = build_loader(config)
        ours = train_step(config, trainable, loader, dist, 1, microbatches, None)
        loader.close()
    finally:
        shutdown()
    hf = hf.cuda()
    loader = build_loader(config)
    batches = [next(loader).to("cuda") for _ in range(microbatches)]
    loader.close()
    loss_tokens = sum(b.num_loss_tokens for b in batches)
    for batch in batches:
        (hf_loss_sum(hf, batch, config) / loss_tokens).backward()
    hf_norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in hf.parameters()]))
    print(f"\nfirst-step grad norm: ours {ours.grad_norm:.6f}, transformers {hf_norm.item():.6f}")
    assert ours.grad_norm == pytest.approx(hf_norm.item(), rel=3e-2)


def test_resume_continues_exactly(tmp_path):
    common = [
        "train.train_iters=6",
        "checkpoint.save_interval=3",
        "checkpoint.most_recent_k=5",
        "train.deterministic=true",
        "train.eval_interval=3",
        "train.eval_iters=2",
        "optimizer.lr_warmup_iters=2",
    ]
    full = train(load_config("tiny", overrides=[*common, f"train.output_dir={tmp_path / 'full'}"]), resume=False)
    saved = tmp_path / "full" / "checkpoints" / "iter_0000003"
    assert latest_checkpoint(tmp_path / "full" / "checkpoints").name == "iter_0000006"
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(saved, resumed_dir / "iter_0000003.partial")
    finalize(resumed_dir / "iter_0000003.partial", resumed_dir / "iter_0000003")
    resumed = train(load_config("tiny", overrides=[*common, f"train.output_dir={tmp_path / 'resumed'}"]), resume=True)
    print("\nuninterrupted:", [(s.step, s.loss, s.grad_norm) for s in full])
    print("resumed:      ", [(s.step, s.loss, s.grad_norm) for s in resumed])
    assert [s.step for s in resumed] == [4, 5, 6]
    for a, b in zip(full[3:], resumed, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-6, abs=1e-6), (a, b)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4), (a, b)


def test_compiled_run_follows_the_eager_run_without_recompiling(tmp_path):
    """`train.compile=true` on the tiny recipe: the losses follow the eager run's (bf16, other kernels) and the
    compiled-graph count stops growing after the first step, although every microbatch brings other images."""
    common = ["train.train_iters=8", "optimizer.lr_warmup_iters=2", "data.num_workers=0"]
    eager = train(load_config("tiny", overrides=[*common, f"train.output_dir={tmp_path / 'eager'}"]), resume=False)
    compiled = train(
        load_config("tiny", overrides=[*common, "train.compile=true", f"train.output_dir={tmp_path / 'compiled'}"]),
        resume=False,
    )
    print("\neager:   ", [round(s.loss, 4) for s in eager], [round(s.step_time_s, 3) for s in eager])
    print("compiled:", [round(s.loss, 4) for s in compiled], [round(s.step_time_s, 3) for s in compiled])
    print("compiled graphs after each step:", [s.compiled_graphs for s in compiled])
    assert all(s.compiled_graphs is None for s in eager)
    assert compiled[0].compiled_graphs > 0
    assert compiled[-1].compiled_graphs == compiled[0].compiled_graphs
    for a, b in zip(eager, compiled, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=2e-2), (a, b)


def _losses(output: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"^step\s+(\d+)\s+loss\s+([\d.naninf]+)", output, re.M)}


def test_a_signal_mid_run_saves_and_resuming_continues_the_uninterrupted_run(tmp_path):
    """SIGTERM to `vlm-fsdp train` after step 3 is logged: the run finishes its step, saves, exits 0, and
    `--resume` ends with the weights of the uninterrupted run, bit for bit (deterministic kernels)."""
    common = ["train.train_iters=8", "train.deterministic=true", "optimizer.lr_warmup_iters=2", "data.num_workers=0"]
    full = train(load_config("tiny", overrides=[*common, f"train.output_dir={tmp_path / 'full'}"]), resume=False)
    command = [sys.executable, "-m", "vlm_fsdp.cli.main", "train", *common, f"train.output_dir={tmp_path / 'cut'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if re.match(r"^step\s+3\s", line):
            process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 0, "".join(lines[-40:])
    first = "".join(lines)
    stopped = int(re.search(r"stopped after step (\d+) on SIGTERM", first).group(1))
    assert 3 <= stopped < 8
    second = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    print(f"\nstopped after step {stopped}; resumed run:\n{second.stdout[-1500:]}")
    losses = _losses(first) | _losses(second.stdout)
    assert sorted(losses) == list(range(1, 9))
    for stats in full:
        assert losses[stats.step] == pytest.approx(stats.loss, abs=1e-4), stats.step
    ours = model_tensors(tmp_path / "cut" / "checkpoints" / "iter_0000008")
    reference = model_tensors(tmp_path / "full" / "checkpoints" / "iter_0000008")
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name


def test_a_step_with_a_nan_is_skipped_and_training_goes_on(tmp_path):
    """NaN pixels in the second step's microbatches: that step changes no weight and does not advance the
    schedule; the next step trains normally."""
    from vlm_fsdp.train.loop import train_step

    from .gloo.scenarios import Poisoned

    config = load_config("tiny", overrides=["data.num_workers=0", f"train.output_dir={tmp_path}"])
    microbatches = config.train.global_batch_size // config.train.micro_batch_size
    dist = init_distributed(config)
    try:
        trainable = build(config, dist.device)
        loader = build_loader(config)
        poisoned = Poisoned(loader, microbatches, microbatches)
        steps, weights = [], []
        for step in (1, 2, 3):
            steps.append(train_step(config, trainable, poisoned, dist, step, microbatches, None))
            weights.append({k: v.to_local().clone() for k, v in model_state(trainable.wrapped).items()})
        loader.close()
    finally:
        shutdown()
    print("\nsteps:", [(s.step, s.loss, s.grad_norm, s.lr, s.skipped) for s in steps])
    assert poisoned.poisoned >= 1
    assert [s.skipped for s in steps] == [False, True, False]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[0])
    # the rate each step leaves for the next: unchanged over the skipped step
    assert steps[1].lr == steps[0].lr and torch.isfinite(torch.tensor(steps[2].loss))


def test_batches_arrive_in_pinned_memory():
    """The loader's pinning thread page-locks every tensor, so the copies to the GPU do not block the step."""
    loader = build_loader(load_config("tiny"))
    try:
        batch = next(loader)
    finally:
        loader.close()
    assert batch.has_images
    assert all(t.is_pinned() for t in (batch.input_ids, batch.labels, batch.pixel_values, batch.cu_seqlens))


@pytest.mark.slow
def test_default_run_learns_and_writes_a_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "vlm_fsdp.cli.main", "train", f"train.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
    )
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0
    losses = [float(x) for x in re.findall(r"^step\s+\d+\s+loss\s+([\d.]+)", result.stdout, re.M)]
    assert len(losses) >= 100
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    assert "TFLOP/s" in result.stdout and "MFU" in result.stdout
    assert latest_checkpoint(Path(tmp_path) / "checkpoints") is not None


def test_round_tripped_model_gives_the_same_logits(tmp_path):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    from vlm_fsdp.cli.main import main
    from vlm_fsdp.model.hf_config import hf_config_dict

    config = load_config("tiny", overrides=["data.num_workers=0"])
    torch.manual_seed(0)
    hf = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(**hf_config_dict(config.model))).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", "hf-to-fsdp", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "fsdp-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    # both read from disk: a model cast in memory with .to(bfloat16) also casts its rotary buffers
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    back = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path / "back", dtype=torch.bfloat16)
    back_state = back.state_dict()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, back_state[name]), name
    loader = build_loader(config)
    batch = next(loader).to("cuda")
    loader.close()
    ids = batch.input_ids[:1, : batch.cu_seqlens[1]]
    with torch.no_grad():
        before = hf.cuda().eval()(input_ids=ids).logits.float()
        after = back.cuda().eval()(input_ids=ids).logits.float()
    difference = (before - after).abs().max().item()
    print(f"\nround trip: max |logit difference| {difference}")
    assert difference < 1e-3
