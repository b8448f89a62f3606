"""Every script in scripts/ works from a checkout after either README install
(issue 14, item 5).

After ``pip install .`` (not editable) the source tree's ``vhostballoon/``
has no compiled ``_native``; only the installed copy does. A fresh install
into a temporary venv per run would cost a C build; instead this test lays
out exactly what such an install leaves: a *checkout* (``scripts/`` and the
source package, without any ``_native*.so``) and a fresh venv (``venv``
module, no pip) whose ``site-packages`` holds the package with its compiled
extension, as ``pip install .`` puts it, and reaches the other dependencies
through a ``.pth`` line naming this test run's ``site-packages`` (whose
editable-install hook, a ``.pth`` of its own, is therefore not run: nothing
maps the checkout to the compiled module). The scripts run from the checkout as an operator runs them
(``python scripts/NAME.py``, cwd = the checkout) and must import the
installed package, and so must every back-end process they start: before
the fix, ``python -m vhostballoon`` put the current directory (the
checkout) first and the daemon died with ``No module named
'vhostballoon._native'``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

import vhostballoon

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(vhostballoon.__file__))
SCRIPTS = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "scripts", "*.py")) + glob.glob(os.path.join(REPO, "scripts", "faults", "*.py"))
    if not os.path.basename(p).startswith("_")
)


@pytest.fixture(scope="module")
def non_editable_layout(tmp_path_factory):
    if not glob.glob(os.path.join(PACKAGE, "_native*.so")):
        pytest.skip(f"no compiled _native next to {PACKAGE}: nothing to install from")
    root = tmp_path_factory.mktemp("installed")
    checkout = root / "checkout"
    shutil.copytree(os.path.join(REPO, "scripts"), checkout / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(REPO, "vhostballoon"), checkout / "vhostballoon",
                    ignore=shutil.ignore_patterns("_native*.so", "__pycache__"))
    venv.create(root / "venv", with_pip=False, symlinks=True)
    python = str(root / "venv" / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    shutil.copytree(PACKAGE, os.path.join(site, "vhostballoon"), ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # the layout is what it claims: from the checkout, its own package (no C core) comes first ...
    broken = subprocess.run([python, "-c", "import vhostballoon._native"], cwd=checkout, env=env,
                            capture_output=True, text=True)
    assert "No module named 'vhostballoon._native'" in broken.stderr, broken
    # ... and the installed one is whole
    whole = subprocess.run([python, "-P", "-c", "import vhostballoon._native as n; print(n.__file__)"],
                           cwd=checkout, env=env, capture_output=True, text=True)
    assert whole.stdout.startswith(site), whole
    return checkout, python, env


def test_every_script_is_listed():
    assert len(SCRIPTS) == 10, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_after_a_plain_install(non_editable_layout, script):
    checkout, python, env = non_editable_layout
    result = subprocess.run([python, script, "--help"], cwd=checkout, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")


def test_no_script_starts_the_back_end_from_the_current_directory():
    """Every ``python -m vhostballoon`` a script starts is ``python -P -m``."""
    offenders = []
    for script in [*SCRIPTS, "scripts/faults/_common.py"]:
        with open(os.path.join(REPO, script)) as f:
            text = f.read()
        if '"-m", "vhostballoon"' in text.replace('"-P", "-m", "vhostballoon"', ""):
            offenders.append(script)
    assert offenders == []


def test_a_script_that_starts_the_daemon_works_after_a_plain_install(non_editable_layout):
    """A real run: backend_killed starts the daemon in its own process (the
    failure of the issue), kills it mid-inflate, restarts it and checks the
    guest's pages (its checks are about pages, not timing)."""
    checkout, python, env = non_editable_layout
    result = subprocess.run(
        [python, "scripts/faults/backend_killed.py", "--ram", "128M", "--seed", "7"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[FAIL]" not in result.stdout and "passed (" in result.stdout.splitlines()[-1]
