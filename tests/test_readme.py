"""The README's two commands are the ones CI runs and the ones that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(python3 -m venv[^\n]*)\n```", text)


def test_ci_runs_the_readme_test_command_verbatim():
    demo, tests = _readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), f"{tests!r} is not a line of .ci/run"
    assert "pytest" in tests and "[test]" in tests
    assert demo.endswith("vhostballoon demo")


def test_console_scripts_named_in_readme_exist():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'vhostballoon = "vhostballoon.cli:main"' in pyproject
    assert 'vhostballoon-ctl = "vhostballoon.ctl:main"' in pyproject
