#!/usr/bin/env python3
"""Print a command that README.md gives, so that CI runs exactly what a reader is told to run.

    python .ci/readme_command.py install   # the first bash block's command, up to the part
                                           # that starts the study (`&& hesslens reproduce`)
    python .ci/readme_command.py tests     # the bash block that runs the tests, whole

Fails loudly (exit 1, a message on stderr) when README.md no longer has what it looks for, so
that the README and CI cannot drift apart unnoticed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
STUDY = "&& hesslens reproduce"


def bash_commands(text: str) -> list[list[str]]:
    """The commands of every ```bash block, in order: lines that are not comments, with
    backslash continuations joined."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        commands, current = [], ""
        for line in body.splitlines():
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            commands.append(" ".join(current.split()))
            current = ""
        blocks.append(commands)
    return blocks


def install_command(text: str) -> str:
    """The install part of the first bash block's first command (before ``&& hesslens
    reproduce``)."""
    blocks = [b for b in bash_commands(text) if b]
    if not blocks:
        raise SystemExit(f"{README}: no ```bash block with a command")
    first = blocks[0][0]
    if STUDY not in first or "pip install" not in first:
        raise SystemExit(f"{README}: the first bash block's command is not "
                         f"'pip install ... {STUDY} ...': {first!r}")
    return first.split(STUDY)[0].strip()


def tests_command(text: str) -> str:
    """The command of the bash block that runs the test suite (``pytest``)."""
    for block in bash_commands(text):
        for command in block:
            if "pytest" in command and "pip install" in command:
                return command
    raise SystemExit(f"{README}: no bash block with 'pip install ... && python -m pytest'")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("install", "tests"):
        raise SystemExit("usage: readme_command.py install|tests")
    text = README.read_text(encoding="utf-8")
    print(install_command(text) if argv[0] == "install" else tests_command(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
