"""MkDocs hook of the docs site (named under `hooks:` in mkdocs.yml).

- adds the reference pages generated from the code (`vlm_fsdp.docs.reference.PAGES`);
- checks every hand-written page against the code (`vlm_fsdp.docs.check`) and logs each mismatch as a warning,
  which fails `mkdocs build --strict`;
- replaces `{{ vlm-fsdp ... }}` lines with the command's output (`vlm_fsdp.docs.embed`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from mkdocs.structure.files import File
from vlm_fsdp.docs.check import problems, unchecked_commands
from vlm_fsdp.docs.embed import EmbedError, expand
from vlm_fsdp.docs.reference import PAGES

log = logging.getLogger("mkdocs.hooks.vlm_fsdp")


def on_files(files, config):
    for path, page in PAGES.items():
        files.append(File.generated(config, path, content=page()))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri in PAGES:
        return markdown
    root = Path(config.config_file_path).parent
    for problem in problems(markdown, root):
        log.warning(f"{page.file.src_uri}: {problem}")
    for command in unchecked_commands(markdown):
        log.info(f"{page.file.src_uri}: not checked, vlm-fsdp-convert does not register it here: {command}")
    try:
        return expand(markdown, root)
    except EmbedError as error:
        log.warning(f"{page.file.src_uri}: {error}")
        return markdown
