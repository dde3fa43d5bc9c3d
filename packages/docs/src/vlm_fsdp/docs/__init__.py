"""Tooling of the docs site: reference pages generated from the code, checks of hand-written pages against it,
and command output embedded at build time; `hooks` connects them to MkDocs (see mkdocs.yml)."""
