"""The multimodal data pipeline: conversation JSONL -> Energon shards -> packed, balanced, resumable microbatches.

prepare.py     JSONL -> Megatron-Energon WebDataset shards (`vlm-fsdp data prepare`)
energon.py     indexing shards as an Energon dataset; random access to its samples
bundled.py     the bundled photos, conversations and tokenizer (prepared into a cache on first use)
tokenizer.py   tokenizer loading, Qwen3-VL special tokens, checks against the model config
chat.py        the sample format and the Qwen3-VL chat template with assistant-only loss
images.py      resize rule, resolution buckets, Hugging Face's flattened patch layout
rope_index.py  3D multimodal RoPE position ids
packing.py     first-fit-decreasing packing under token and patch budgets
balance.py     spreading packed sequences over data-parallel ranks by patch count
batch.py       the `Batch` the trainer consumes
loader.py      `build_loader`: sample order, workers, skips, exact resume
inspect.py     `vlm-fsdp data inspect`;  bench.py: `vlm-fsdp data bench`
"""
