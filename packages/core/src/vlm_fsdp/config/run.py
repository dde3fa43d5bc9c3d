"""Data, training, optimizer, parallelism, checkpoint and logging configuration, and the top-level `Config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from vlm_fsdp.config.fields import Length, Range
from vlm_fsdp.config.model import MAX_GPUS, ModelConfig

# Upper bounds of counts of steps and samples: far above any run, small enough for exact arithmetic.
MAX_STEPS = 10**9
MAX_BATCH = 2**24
MAX_PIXELS = 2**30
MAX_IMAGE_SIDE = 2**15

ShardingStrategy = Literal["no_shard", "optim", "optim_grads", "optim_grads_params"]


@dataclass(kw_only=True)
class DataConfig:
    """Where training samples come from and how they become packed, balanced microbatches."""

    path: str | None = None
    """Dataset directory (Megatron-Energon WebDataset, see `vlm-fsdp data prepare`); null: the bundled data."""
    text_only: bool = False
    """Train on the text-only part of the data (a baseline without the vision path): the bundled text set, or the
    samples of data.path that have no image. The vision tower is then left untrained (`frozen_parts`)."""
    tokenizer: str | None = None
    """A `tokenizer.json`, or a Hugging Face model directory holding one (its `preprocessor_config.json` then sets
    the image normalisation and pixel limits); null: the bundled tokenizer, or model.hf_path's when set."""
    num_workers: Annotated[int, Range(ge=0, le=1024)] | None = None
    """Data-loading worker processes per rank (started with forkserver); 0 decodes in the training process;
    null: one per CPU core of this rank's share of the node, less one for the rank itself, at most 4."""
    prefetch_factor: Annotated[int, Range(ge=1, le=1024)] = 2
    """Microbatches each worker prepares ahead of the training loop."""
    timeout_seconds: Annotated[float, Range(gt=0, le=7 * 24 * 3600)] = 120.0
    """Fail with an error when the workers deliver no microbatch for this long (a training window packed ahead that
    takes this long is packed in the rank's process instead)."""
    strict: bool = False
    """Stop with an error at the first unusable sample (corrupt or missing image, too long); false: skip it,
    count it and log its id."""
    image_buckets: Annotated[
        list[Annotated[list[Annotated[int, Range(ge=1, le=MAX_IMAGE_SIDE)]], Length(2, 2, "sides [height, width]")]],
        Length(max=1024, what="buckets"),
    ] = field(
        default_factory=lambda: [[672, 672], [576, 768], [768, 576], [544, 832], [832, 544], [512, 896], [896, 512]]
    )
    """Allowed image sizes as [height, width] pairs (multiples of patch size x merge size, 32): every image is
    resized to the one closest in aspect ratio, then in area. The default, 1,728-1,792 patches (432-448 tokens)
    each, puts about 8 photos into a 4096-token sequence. An empty list keeps each image's own size (Qwen's resize
    within min/max pixels: many distinct shapes)."""
    min_pixels: Annotated[int, Range(ge=1, le=MAX_PIXELS)] | None = None
    """Smallest image area (pixels) of Qwen's resize rule; null: the model directory's preprocessor setting, else
    Qwen3-VL's 65,536."""
    max_pixels: Annotated[int, Range(ge=1, le=MAX_PIXELS)] | None = None
    """Largest image area (pixels) of Qwen's resize rule; null: the model directory's preprocessor setting, else
    Qwen3-VL's 16,777,216."""
    max_patches_per_microbatch: Annotated[int, Range(ge=1, le=MAX_PIXELS)] | None = None
    """Vision patch budget of one microbatch (each packed sequence gets an equal share); null: bounded only by
    model.seq_length (4 patches per image token)."""
    packing_window: Annotated[int, Range(ge=1, le=65536)] = 32
    """Sequences planned together: samples are taken in order until they fill this many sequences of
    model.seq_length tokens, then packed by first-fit decreasing (more: fuller sequences, longer look-ahead)."""


@dataclass(kw_only=True)
class TrainConfig:
    """The step loop."""

    train_iters: Annotated[int, Range(ge=1, le=MAX_STEPS)] = 100
    """Optimizer steps to run."""
    global_batch_size: Annotated[int, Range(ge=1, le=MAX_BATCH)] = 8
    """Sequences per optimizer step, summed over data-parallel ranks and accumulated microbatches."""
    micro_batch_size: Annotated[int, Range(ge=1, le=MAX_BATCH)] = 1
    """Sequences per forward/backward pass on one rank."""
    eval_interval: Annotated[int, Range(ge=1, le=MAX_STEPS)] | None = None
    """Run validation every this many steps; null: never."""
    eval_iters: Annotated[int, Range(ge=1, le=MAX_STEPS)] = 5
    """Validation batches per evaluation."""
    seed: Annotated[int, Range(ge=0, le=2**32 - 1)] = 1234
    """Seed of parameter initialisation, data order and dropout."""
    deterministic: bool = False
    """Use deterministic kernels only (slower; an operation without one is an error), so a run and its resumed copy
    match exactly."""
    max_bad_steps: Annotated[int, Range(ge=1, le=MAX_STEPS)] = 3
    """Stop with an error after this many optimizer steps in a row whose loss or gradient norm is not finite (each
    such step is skipped: no update, the schedule does not advance)."""
    compile: bool = False
    """torch.compile the computation inside each Megatron-FSDP unit (vision blocks; decoder self-attention and
    experts) and the loss's per-chunk softmax gradient, with dynamic shapes, so that new image sizes reuse the
    compiled code; the step log counts the compiled graphs."""
    output_dir: str | None = None
    """Directory of this run's resolved config, logs and (unless checkpoint.save is set) checkpoints;
    null: `runs/<recipe>-<UTC time>`."""


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: Annotated[float, Range(ge=0, le=1)] = 3e-4
    """Peak learning rate."""
    min_lr: Annotated[float, Range(ge=0, le=1)] = 3e-5
    """Learning rate at the end of the decay."""
    lr_warmup_iters: Annotated[int, Range(ge=0, le=MAX_STEPS)] = 10
    """Steps of linear warm-up from 0 to lr."""
    lr_decay_iters: Annotated[int, Range(ge=1, le=MAX_STEPS)] | None = None
    """Steps over which the rate decays to min_lr; null: train.train_iters."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warm-up."""
    weight_decay: Annotated[float, Range(ge=0, le=10)] = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    adam_beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """Adam first-moment decay."""
    adam_beta2: Annotated[float, Range(ge=0, lt=1)] = 0.95
    """Adam second-moment decay."""
    adam_eps: Annotated[float, Range(gt=0, le=1)] = 1e-8
    """Adam epsilon."""
    clip_grad: Annotated[float, Range(ge=0)] = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass(kw_only=True)
class DDPConfig:
    """Data-parallel settings, named as in Megatron-Core's `DistributedDataParallelConfig`.

    Fields left null are derived from `dist.use_megatron_fsdp` (see `vlm_fsdp.config.megatron_fsdp`)."""

    data_parallel_sharding_strategy: ShardingStrategy | None = None
    """What Megatron-FSDP shards across data-parallel ranks: `no_shard`, `optim_grads` (optimizer state and
    gradients) or `optim_grads_params` (+ parameters, ZeRO-3); `optim` (optimizer state only) is refused, its
    gradients being wrong on several ranks in megatron-core 0.16.1; null: optim_grads_params with Megatron-FSDP."""
    outer_dp_sharding_strategy: Literal["no_shard", "optim"] = "no_shard"
    """Hybrid sharding: what is sharded across the outer data-parallel groups; only `no_shard` (replicas) is
    implemented."""
    num_distributed_optimizer_instances: Annotated[int, Range(ge=1, le=MAX_GPUS)] = 1
    """Data-parallel replicas of the sharded state (hybrid FSDP: shard inside a group, replicate across groups)."""
    use_distributed_optimizer: bool | None = None
    """Use Megatron's distributed optimizer, which Megatron-FSDP needs (false is refused); null: on."""
    overlap_grad_reduce: bool | None = None
    """Overlap gradient reduce-scatter with the backward pass; null: on with Megatron-FSDP."""
    overlap_param_gather: bool | None = None
    """Overlap parameter all-gather with compute; null: on with Megatron-FSDP."""
    grad_reduce_in_fp32: bool = False
    """Reduce gradients in fp32 (exact, twice the traffic) instead of bf16."""
    preserve_fp32_weights: bool = True
    """Keep fp32 main weights for the optimizer, with fp32 Adam moments; false: Adam updates the bf16 weights in
    place with bf16 moments and gradients, as torch's AdamW does on a bf16 model (8 bytes of state per trained
    parameter instead of 16 to 20, but an update smaller than a weight's bf16 rounding step is lost)."""
    fsdp_double_buffer: bool = False
    """Keep two persistent all-gather buffers for FSDP units (steadier memory, needed by NCCL user buffers)."""
    nccl_ub: bool = False
    """Register FSDP communication buffers with NCCL (user buffers) for zero-copy collectives."""


@dataclass(kw_only=True)
class DistConfig:
    """Distributed backend choice."""

    use_megatron_fsdp: bool = True
    """Train with Megatron-FSDP (false is refused: it is the only backend); sets the defaults of every null field
    it owns (see the user guide)."""
    use_torch_fsdp2: bool = False
    """Train with PyTorch FSDP2 instead (refused: not supported; kept so that Megatron-Bridge configs load)."""
    distributed_timeout_minutes: Annotated[int, Range(ge=1, le=7 * 24 * 60)] = 10
    """Timeout of collective operations before a rank gives up."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Saving and loading training state."""

    save: str | None = None
    """Directory to write checkpoints to; null: `<train.output_dir>/checkpoints`."""
    load: str | None = None
    """Checkpoint directory to start from (a training checkpoint or one made by `vlm-fsdp convert`)."""
    save_interval: Annotated[int, Range(ge=1, le=MAX_STEPS)] | None = None
    """Save every this many steps (and at the end); null: only at the end."""
    ckpt_format: Literal["fsdp_dtensor", "torch_dist"] | None = None
    """On-disk format: `fsdp_dtensor` (torch.distributed.checkpoint of DTensors) or Megatron's `torch_dist`;
    null: fsdp_dtensor with Megatron-FSDP."""
    most_recent_k: Annotated[int, Range(ge=1, le=MAX_STEPS)] = 2
    """Keep this many most recent checkpoints; older ones are deleted after a successful save."""


@dataclass(kw_only=True)
class LoggerConfig:
    """Step log, TensorBoard and Weights & Biases."""

    log_interval: Annotated[int, Range(ge=1, le=MAX_STEPS)] = 1
    """Print a step line every this many steps."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory; null: `<train.output_dir>/tensorboard`."""
    wandb_project: str | None = None
    """Weights & Biases project; null: W&B off."""
    wandb_exp_name: str | None = None
    """Weights & Biases run name; null: the output directory's name."""
    wandb_mode: Literal["online", "offline"] = "online"
    """`offline` writes W&B files locally for a later `wandb sync`."""


@dataclass(kw_only=True)
class Config:
    """Everything a run needs; saved next to its outputs as `config.yaml`."""

    recipe: str = "custom"
    """Name of the recipe this config started from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model and its parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The step loop."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""
    ddp: DDPConfig = field(default_factory=DDPConfig)
    """Data-parallel and Megatron-FSDP settings."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Distributed backend."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Logging."""


@dataclass(frozen=True, kw_only=True)
class FrozenParts:
    """The parts of the model a run leaves untrained."""

    language_model: bool
    vision_model: bool
    """The vision transformer blocks and patch embedding."""
    vision_projection: bool
    """The patch merger and DeepStack mergers."""


def frozen_parts(config: Config) -> FrozenParts:
    """The freeze switches, and the whole vision tower under data.text_only: no image reaches it, so it would get
    only zero gradients, and AdamW would still decay its weights and spend a quarter of every update on it (on the
    30B-A3B proxy)."""
    m, text_only = config.model, config.data.text_only
    return FrozenParts(
        language_model=m.freeze_language_model,
        vision_model=m.freeze_vision_model or text_only,
        vision_projection=m.freeze_vision_projection or text_only,
    )
