"""The canary (scripts/canary.py) in the suite: a bounded mixed run with fixed
seeds (inflate, deflate, deflate-on-OOM, free page reporting, guest writes,
front-end reconnects, daemon restarts) against the real daemon process; after
every operation each page the guest owns must hold what it wrote and the host
must have freed exactly the pages in the balloon plus the reported ones.

A failure prints the script's report; rerun it by hand with the same
arguments (``python scripts/canary.py ARGS``).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")

# About 45 s in all on a 2-core machine (the THP run below included).
RUNS = {
    "linux-order": ["--duration", "12", "--ram", "128M", "--seed", "7"],
    "random-order": ["--duration", "8", "--ram", "128M", "--seed", "11", "--order", "random"],
    # The daemon under its seccomp allow-list: reconnects, restarts (SIGTERM),
    # reporting, stats and worker-thread discards all inside it.
    "sandboxed": ["--duration", "8", "--ram", "128M", "--seed", "13", "--sandbox"],
}


def run_canary(argv, capsys) -> str:
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    canary = importlib.import_module("canary")
    status = canary.main(argv)
    report = capsys.readouterr().out
    failed = "\n".join(line for line in report.splitlines() if "[FAIL]" in line or line.startswith(("canary:", "==")))
    assert status == 0, f"scripts/canary.py {' '.join(argv)} failed:\n{failed}"
    summary = [line for line in report.splitlines() if line.startswith("canary: ")]
    assert summary and summary[-1].endswith("lost: 0"), report
    with capsys.disabled():
        print("\n" + summary[-1])
    return summary[-1]


@pytest.mark.parametrize("name", RUNS)
def test_canary(name, capsys):
    if "--sandbox" in RUNS[name]:
        pytest.importorskip("pyseccomp")
    summary = run_canary(RUNS[name], capsys)
    checks = int(summary.split(" checks,")[0].rsplit(" ", 1)[1])
    assert f"at {checks} of {checks} checks" in summary, summary


def test_canary_on_transparent_huge_pages(shmem_thp_advise, capsys):
    """Guest RAM madvised for THP: the back-end tracks partial huge pages and
    frees them by policy (auto, flush after 1 s); the same exact checks."""
    run_canary(["--duration", "8", "--ram", "128M", "--seed", "5", "--thp"], capsys)
