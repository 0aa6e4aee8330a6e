"""The README's two set-up commands stay true: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", setup, flags=re.S)]


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), "each set-up command is one line"
    assert cmds[0].endswith("vald-md serve")
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci
    assert "shared/data" in ci and "exit 1" in ci


def test_readme_first_hour_works_in_a_new_shell():
    """A new shell has no ``vald-md`` on its PATH; the server runs in the foreground; the docs live under /api."""
    text = (ROOT / "README.md").read_text()
    after_setup = text.split("## Set-up", 1)[1].split("## A short tour", 1)[0]
    assert ".venv/bin/vald-md users add" in after_setup and "second terminal" in after_setup
    assert "source .venv/bin/activate" in after_setup and "command not found" in after_setup
    assert "--port" in after_setup and "VALD_MD_PORT" in after_setup and "docs/DEPLOYMENT.md" in after_setup
    # every bare `vald-md` command block comes after the activation is explained
    commands = text.split("### Command line", 1)[1]
    assert "source .venv/bin/activate" in commands.split("```bash", 1)[0]
    assert "OpenAPI at `/docs`" not in text and "`/api/docs`" in text and "`/api/openapi.json`" in text
    deployment = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    assert "`VALD_MD_PORT`" in deployment and "`VALD_MD_MAX_STEPS`" in deployment
