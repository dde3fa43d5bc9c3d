"""The docs cannot drift from the code: generated reference pages cover every config key, recipe and command,
and every key, YAML block and command written in the hand-written pages exists (the same check fails the
strict build)."""

from __future__ import annotations

from pathlib import Path

import pytest
from vlm_fsdp.cli.main import build_parser
from vlm_fsdp.config.fields import field_docs
from vlm_fsdp.config.megatron_fsdp import DEFAULTS
from vlm_fsdp.config.overrides import all_keys
from vlm_fsdp.config.recipes import recipe_names
from vlm_fsdp.config.run import Config
from vlm_fsdp.docs import reference
from vlm_fsdp.docs.check import EXTERNAL_COMMANDS, commands, config_keys, problems, unchecked_commands
from vlm_fsdp.docs.embed import EmbedError, expand

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md"))
GUIDE = ROOT / "docs" / "guide" / "megatron-fsdp.md"


def test_config_reference_has_every_key_with_its_docstring():
    page = reference.config_reference()
    for key in all_keys(Config):
        assert f"| `{key}` |" in page, f"{key} is missing from the configuration reference"
    for _, cls in reference.sections():
        for doc in field_docs(cls).values():
            assert reference.cell(doc) in page


def test_config_reference_shows_the_default_of_switched_keys():
    page = reference.config_reference()
    row = next(line for line in page.splitlines() if line.startswith("| `ddp.data_parallel_sharding_strategy` |"))
    assert "`null`: `optim_grads_params` with Megatron-FSDP" in row
    assert "\\| null" in row  # the type, with its pipe escaped for the table


def test_recipe_reference_has_every_recipe_with_its_architecture():
    page = reference.recipes_reference()
    for name in recipe_names():
        assert f"## `{name}` {{#{name}}}" in page
    assert "235,670,022,896" in page  # Qwen3-VL-235B-A22B's total parameter count
    assert "| decoder layers | 94 |" in page


def test_cli_reference_has_the_help_of_every_command():
    page = reference.cli_reference()
    names = [name for name, _ in reference.commands(build_parser())]
    assert {"train", "plan", "config", "recipes", "slurm"} <= set(names)
    for name, parser in reference.commands(build_parser()):
        assert reference.help_text(parser).rstrip() in page, name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_hand_written_page_matches_the_code(page):
    assert problems(page.read_text(), ROOT) == []


def test_pages_name_config_keys_and_commands():
    """The page check has something to check: the guide spells keys, and the pages hold runnable commands."""
    assert len(config_keys(GUIDE.read_text())) > 15
    runnable = [words for page in PAGES for words, run in commands(page.read_text()) if run]
    assert {words[1] for words in runnable} >= {"train", "plan", "slurm", "convert", "inspect"}


def test_only_commands_of_other_packages_go_unchecked():
    for page in PAGES:
        for command in unchecked_commands(page.read_text()):
            assert command.split()[1] in EXTERNAL_COMMANDS


def test_guide_maps_every_switched_setting_to_its_megatron_lm_flag():
    rows = [line for line in GUIDE.read_text().splitlines() if line.startswith("| ")]
    for (section, name), with_fsdp in DEFAULTS.items():
        (row,) = [r for r in rows if f"| `{section}.{name}` |" in r]
        assert f"`{reference.value(with_fsdp)}`" in row, f"the guide states another default for {section}.{name}"
        assert "`--" in row, f"the guide gives no Megatron-LM flag for {section}.{name}"
    text = GUIDE.read_text()
    for flag in (
        "--use-megatron-fsdp",
        "--data-parallel-sharding-strategy",
        "--init-model-with-meta-device",
        "--grad-reduce-in-bf16",
        "--fsdp-double-buffer",
        "--use-nccl-ub",
        "--calculate-per-token-loss",
        "--ckpt-format fsdp_dtensor",
        "--no-gradient-accumulation-fusion",
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        "--overlap-param-gather",
        "--outer-dp-sharding-strategy",
        "--num-distributed-optimizer-instances",
        "CUDA_DEVICE_MAX_CONNECTIONS",
    ):
        assert f"`{flag}`" in text, flag


BAD_PAGE = """
Keys are checked in code only: model.not_a_key in prose is ignored, `model.seq_lenght` is not.
The package `vlm-fsdp-docs` is no command; `vlm-fsdp slurm` is a mention without its required arguments.

```yaml
ddp:
  overlap_grad_reduce: true
  double_buffer: true
```

```bash
vlm-fsdp trian --recipe tiny
vlm-fsdp plan --recipe tiny --gpus-count 8
vlm-fsdp slurm --recipe qwen3_vl_30b_a3b --nodes 3 \\
    --config-file recipes/qwen3_vl_30b_a3b_mfsdp.yaml
vlm-fsdp train --recipe tiny train.train_iters=0 | tee log.txt
```

Mentions are checked for names and options: `vlm-fsdp slurm --partition` and `vlm-fsdp recipes --all`.
"""


def test_page_check_reports_every_kind_of_drift():
    found = problems(BAD_PAGE, ROOT)
    expected = [
        "`model.seq_lenght` is not a config key",
        "YAML block is not a valid config file: unknown config key 'ddp.double_buffer'.",
        "`vlm-fsdp trian --recipe tiny`: no such vlm-fsdp command",
        "`vlm-fsdp plan --recipe tiny --gpus-count 8`: vlm-fsdp: error: unrecognized arguments: --gpus-count",
        "train.global_batch_size=32 is not a multiple of micro_batch_size x data-parallel size = 1 x 24",
        "train.train_iters must be at least 1",
        "`vlm-fsdp slurm --partition`: vlm-fsdp slurm has no option --partition",
        "`vlm-fsdp recipes --all`: vlm-fsdp recipes has no option --all",
    ]
    for text in expected:
        assert sum(text in problem for problem in found) == 1, (text, found)
    assert len(found) == len(expected), found


def test_embedded_command_output_is_the_commands_own():
    page = expand("Recipes:\n\n{{ vlm-fsdp recipes }}\n", ROOT)
    assert page.startswith("Recipes:\n\n```console\n$ vlm-fsdp recipes\n")
    for name in recipe_names():
        assert name in page
    plan = expand(
        "{{ vlm-fsdp plan --recipe qwen3_vl_30b_a3b --config-file recipes/qwen3_vl_30b_a3b_mfsdp.yaml --gpus 8 }}", ROOT
    )
    assert "Verdict: DOES NOT FIT" in plan  # plan's exit status 1 is a verdict worth showing, not a failure


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{{ vlm-fsdp train --recipe tiny }}", "only plan, config, recipes, slurm can be embedded"),
        ("{{ vlm-fsdp config --recipe tiny model.seq_lenght=1 }}", "unknown config key 'model.seq_lenght'"),
    ],
)
def test_embedding_refuses_commands_with_effects_and_failing_commands(line, reason):
    with pytest.raises(EmbedError, match=reason):
        expand(line, ROOT)
