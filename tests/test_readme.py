"""The README's shell examples run verbatim and print what the README says.

Every ```sh block runs, in order, in one fresh directory (as a reader would run
them one after the other), each block in its own shell, each line checked:

* every command succeeds, unless its comment starts with an errno
  (``# EPERM: ...``): then it fails with exit code 1 and that errno;
* ``# prints VALUE`` means stdout is exactly VALUE;
* a command with ``--json`` prints valid JSON;
* nothing ever prints a traceback.

A ```python block announced as a file (a line ending in ```name.py`:``) is
written to that file first, so the shell examples can run it. A quoted
here-document (``cat > FILE <<'EOF'`` up to ``EOF``) is one command, its body
kept as written (comments too).

Some things cannot run as they would for a reader: ``pip install`` (the package
under test is already installed in this environment, from this checkout; the
line is shown as skipped), ``apt-get``, running this project's own test suite
from inside it (``python -m pytest`` without a test file is skipped the same
way) and the kernel oracle, which boots a real kernel for a minute and more
(the ``kernel``-marked tests run it, with its shipped scenarios).
Other people's tools the README uses (``sqlite3``, ``jq``) are skipped where
they are not installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PACKAGE_PARENT, subprocess_env

README = PACKAGE_PARENT / "README.md"
CHECKOUT = README.parent

pytestmark = pytest.mark.skipif(not README.is_file(), reason="no README next to the package (installed elsewhere)")

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_FILE_INTRO = re.compile(r"`([\w.-]+\.py)`:\s*$")
_PRINTS = re.compile(r"^prints\s+(\S+?)[,:;.]?(?:\s|$)")
_ERRNO = re.compile(r"^(E[A-Z0-9]+):")
#: a quoted here-document's delimiter: its body is written as it is, so the reader's file is the test's
_HEREDOC = re.compile(r"<<-?\s*'(\w+)'")

#: shell functions standing in for what cannot run here (see the module docstring)
PRELUDE = """
command_not_found_handle() {
    case "$1" in
        sqlite3|jq) echo "(README test: '$1' is not installed here: skipped)" >&2; return 0 ;;
        *) echo "bash: $1: command not found" >&2; return 127 ;;
    esac
}
pip() { echo "(README test: 'pip $*' skipped: this checkout is installed already)" >&2; }
apt-get() { echo "(README test: 'apt-get $*' skipped: system packages are CI's to install)" >&2; }
python() {
    if [ "$1" = -m ] && [ "$2" = pytest ] && ! printf '%s\\n' "$@" | grep -q '\\.py$'; then
        echo "(README test: 'python $*' skipped: it is the suite running this test)" >&2
    elif [ "$1" = -m ] && [ "$2" = iommupt_store.kernel_oracle ]; then
        echo "(README test: 'python $*' skipped: the kernel-marked tests boot the real kernel)" >&2
    else
        command python "$@"
    fi
}
"""


@dataclass(frozen=True)
class Line:
    block: int
    command: str
    comment: str

    @property
    def expected_errno(self) -> str | None:
        m = _ERRNO.match(self.comment)
        return m[1] if m else None

    @property
    def expected_stdout(self) -> str | None:
        m = _PRINTS.match(self.comment)
        return m[1] if m else None


def split_comment(line: str) -> tuple[str, str]:
    """``command  # comment`` into its two parts; a ``#`` inside quotes is not a comment."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def readme_blocks(text: str) -> tuple[list[list[Line]], dict[str, str]]:
    """The sh blocks as lines to run, and the python blocks that are files (name -> source)."""
    blocks: list[list[Line]] = []
    files: dict[str, str] = {}
    for m in _BLOCK.finditer(text):
        lang, body = m[1], m[2]
        if lang == "python":
            before = text[: m.start()].rstrip("\n").splitlines()
            if before and (named := _FILE_INTRO.search(before[-1])):
                files[named[1]] = body
        elif lang == "sh":
            blocks.append(_sh_lines(body, len(blocks)))
    return blocks, files


def _sh_lines(body: str, block: int) -> list[Line]:
    """A block's commands; a here-document (``cat > f <<'EOF'`` ... ``EOF``) is one command with its body."""
    lines: list[Line] = []
    raw_lines = iter(body.replace("\\\n", " ").splitlines())
    for raw in raw_lines:
        command, comment = split_comment(raw)
        if not command:
            continue
        if heredoc := _HEREDOC.search(command):
            body_lines = []
            for inner in raw_lines:
                body_lines.append(inner)
                if inner == heredoc[1]:
                    break
            command = "\n".join([command, *body_lines])
        lines.append(Line(block, command, comment))
    return lines


def test_the_readme_has_examples_to_run() -> None:
    blocks, files = readme_blocks(README.read_text())
    assert len(blocks) >= 8
    assert "test_restart.py" in files
    lines = [ln for b in blocks for ln in b]
    assert any(ln.expected_errno for ln in lines) and any(ln.expected_stdout for ln in lines)


def test_split_comment() -> None:
    assert split_comment("a 'b # c' d  # e f") == ("a 'b # c' d", "e f")
    assert split_comment("# only a comment") == ("", "only a comment")
    assert split_comment("x#y") == ("x#y", "")


def test_a_here_document_is_one_command() -> None:
    [lines] = readme_blocks("```sh\ncat > a.py <<'EOF'\nx = 1  # kept\n\nEOF\npython a.py  # prints 1\n```\n")[0]
    assert [ln.command for ln in lines] == ["cat > a.py <<'EOF'\nx = 1  # kept\n\nEOF", "python a.py"]


@pytest.mark.slow
def test_readme_shell_examples(tmp_path: Path) -> None:
    run_examples(README.read_text(), tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "```sh\necho 2   # prints 3\n```\n",
        "```sh\ntrue   # EPERM: should have failed\n```\n",
        "```sh\nfalse\n```\n",
        "```sh\necho '{' --json\n```\n",
        "`t.py`:\n\n```python\nraise SystemExit(3)\n```\n\n```sh\npython t.py\n```\n",
    ],
    ids=["wrong-output", "no-failure", "failure", "bad-json", "file"],
)
def test_the_checks_can_fail(tmp_path: Path, text: str) -> None:
    with pytest.raises(AssertionError):
        run_examples(text, tmp_path)


def run_examples(text: str, tmp_path: Path) -> None:
    blocks, files = readme_blocks(text)
    work = tmp_path / "reader"
    work.mkdir()
    for name, source in files.items():
        (work / name).write_text(source)
    out = tmp_path / "outputs"
    out.mkdir()
    env = subprocess_env()
    # the reader's shell finds this environment's iommupt-store, python and pytest first
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("COLUMNS", None)
    for number, lines in enumerate(blocks):
        script = [PRELUDE]
        for i, line in enumerate(lines):
            stem = shlex.quote(str(out / f"{number}.{i}"))
            script.append(f"{{\n{line.command}\n}} >{stem}.out 2>{stem}.err </dev/null; echo $? >{stem}.rc")
        subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, check=True, timeout=600)
        for i, line in enumerate(lines):
            _check(line, out / f"{number}.{i}")


def _check(line: Line, stem: Path) -> None:
    rc = int(stem.with_suffix(stem.suffix + ".rc").read_text())
    stdout = stem.with_suffix(stem.suffix + ".out").read_text()
    stderr = stem.with_suffix(stem.suffix + ".err").read_text()
    where = f"README block {line.block + 1}: {line.command!r} exited {rc}\nstdout: {stdout[-2000:]}\n"
    where += f"stderr: {stderr[-2000:]}"
    assert "Traceback" not in stdout + stderr, where
    if line.expected_errno:
        assert rc == 1, where
        assert f"error: {line.expected_errno}:" in stderr, where
        return
    assert rc == 0, where
    if line.expected_stdout is not None:
        assert stdout.strip() == line.expected_stdout, where
    skipped = stderr.startswith("(README test:")  # a stand-in answered (see PRELUDE)
    if re.search(r"\s--json\b", line.command) and "|" not in line.command and not skipped:
        try:
            json.loads(stdout)
        except ValueError as e:
            raise AssertionError(f"{where}\nnot JSON: {e}") from None
