"""docs/migrations.md runs as written: every ```sh block, in order, with the README's checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_readme import CHECKOUT, readme_blocks, run_examples

DOC = CHECKOUT / "docs" / "migrations.md"

pytestmark = pytest.mark.skipif(not DOC.is_file(), reason="no docs next to the package (installed elsewhere)")


def test_the_doc_has_examples_to_run() -> None:
    blocks, files = readme_blocks(DOC.read_text())
    assert len(blocks) >= 6 and "lab_notes.py" in files
    lines = [ln for b in blocks for ln in b]
    assert any(ln.expected_errno for ln in lines) and any(ln.expected_stdout for ln in lines)
    for command in ("db revision", "db heads", "db stamp", "--sql", "--force", "db downgrade"):
        assert any(command in ln.command for ln in lines), command


@pytest.mark.slow
def test_the_doc_shell_examples(tmp_path: Path) -> None:
    run_examples(DOC.read_text(), tmp_path)
