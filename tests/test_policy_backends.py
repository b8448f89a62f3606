"""vhostballoon-policy, the command, against three real back-ends (each in
the test's trio run on its own control socket) with model guests whose
workloads are told by their statistics (issue 14, items 2 and 3): the
budget is met, the busy guest is kept, the idle ones shrink to no less than
their floor, in steps no larger than --step, and every decision is logged
as JSON with its reasons. Also: --dry-run sets nothing, status shows it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial

import trio

from backend_support import MiB, wait_until
from vhostballoon.server.daemon import run_backend
from vhostballoon.server.service import BalloonService
from vhostballoon.testing import model_guest
from vhostballoon.testing.virtio_balloon import VIRTIO_BALLOON_S_AVAIL

POLICY = [sys.executable, "-m", "vhostballoon.policy.cli"]
RAM = 256 * MiB
USED = {"busy": 200 * MiB, "idle1": 40 * MiB, "idle2": 40 * MiB}
COMMON = ["--budget", "600M", "--step", "64M", "--keep-free-min", "32M", "--default-floor", "128M",
          "--floor", "idle2=176M"]


async def feed_workload(guest, used: int) -> None:
    """What the guest tells as available: its size now minus what its workload uses."""
    while True:
        size = RAM - guest.actual_pages * 4096
        guest.driver.extra_stats[VIRTIO_BALLOON_S_AVAIL] = max(0, size - used)
        await trio.sleep(0.05)


async def start_three(nursery, sock_dir):
    services, guests = {}, {}
    for name in USED:
        os.mkdir(os.path.join(sock_dir, name))
        path = os.path.join(sock_dir, name, "vb.sock")
        services[name] = BalloonService(stats_interval=0.2)
        await nursery.start(partial(run_backend, path, service=services[name]))
    return services


async def test_policy_moves_memory_on_real_backends(sock_dir, nursery):
    services = await start_three(nursery, sock_dir)
    async with model_guest(os.path.join(sock_dir, "busy", "vb.sock"), ram_size=RAM) as busy, \
            model_guest(os.path.join(sock_dir, "idle1", "vb.sock"), ram_size=RAM) as idle1, \
            model_guest(os.path.join(sock_dir, "idle2", "vb.sock"), ram_size=RAM) as idle2:
        guests = {"busy": busy, "idle1": idle1, "idle2": idle2}
        async with trio.open_nursery() as feeders:
            for name, guest in guests.items():
                feeders.start_soon(feed_workload, guest, USED[name])
            await wait_until(lambda: all(s.query_stats()["updates"] >= 2 for s in services.values()), timeout=10,
                             what="statistics from the three guests")
            sockets = os.path.join(sock_dir, "*", "vb.sock.ctl")

            # dry-run: decisions logged, nothing set
            dry = await trio.run_process([*POLICY, "run", "--sockets", sockets, *COMMON, "--dry-run", "--cycles", "1"],
                                         capture_stdout=True, capture_stderr=True, check=False)
            assert dry.returncode == 0, dry.stderr.decode()
            lines = [json.loads(x) for x in dry.stdout.decode().splitlines()]
            decisions = {d["vm"]: d for d in lines if d["event"] == "decision"}
            assert set(decisions) == {"busy", "idle1", "idle2"}
            assert decisions["idle1"]["rule"] == "shrink-budget" and decisions["idle1"]["dry_run"] is True
            assert all(s.target_bytes is None for s in services.values())

            result = await trio.run_process(
                [*POLICY, "run", "--sockets", sockets, *COMMON, "--cycles", "12", "--interval", "0.5"],
                capture_stdout=True, capture_stderr=True, check=False)
            assert result.returncode == 0, result.stderr.decode()
            feeders.cancel_scope.cancel()
        log = [json.loads(x) for x in result.stdout.decode().splitlines()]
        changes = [d for d in log if d["event"] == "decision" and d["change"]]
        targets = {name: s.target_bytes for name, s in services.items()}
        # the budget is met; the busy guest (56 MiB available, keep 51 MiB) is left alone
        assert targets["busy"] is None
        assert (targets["idle1"] or RAM) + (targets["idle2"] or RAM) + RAM <= 600 * MiB
        # floors and steps
        assert targets["idle2"] >= 176 * MiB and targets["idle1"] >= 128 * MiB
        assert all(abs(d["change"]) <= 64 * MiB for d in changes)
        assert all(d["reasons"] and d["rule"] in ("shrink-budget",) for d in changes), changes
        # no flapping: every change in one direction, and few of them
        assert 2 <= len(changes) <= 6, changes
        # the guests really went there
        for name in ("idle1", "idle2"):
            await guests[name].wait_for_target(timeout=30)
            assert services[name].query()["actual"] == targets[name]

        status = await trio.run_process([*POLICY, "status", "--sockets", sockets, *COMMON, "--json"],
                                        capture_stdout=True, check=False)
        view = json.loads(status.stdout)
        assert view["budget"] == 600 * MiB and view["total-target"] <= 600 * MiB
        assert {v["name"]: v["target"] for v in view["vms"]} == targets


def test_policy_refuses_bad_input_clearly():
    for args, says in [
        (["run", "--sockets", "/x", "--floor", "vm1"], "give NAME=SIZE"),
        (["run", "--sockets", "/x", "--step", "lots"], "lots"),
        (["run", "--sockets", "/x", "--host-low", "0.3", "--host-high", "0.2"], "host_low_share"),
        (["run", "--sockets", "/x", "--interval", "0"], "must be > 0"),
    ]:
        result = subprocess.run([*POLICY, *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and says in result.stderr, (args, result.stderr)
    result = subprocess.run([*POLICY, "status", "--sockets", "/nonexistent/*.ctl"], capture_output=True, text=True)
    assert result.returncode == 1 and "no control socket matches /nonexistent/*.ctl" in result.stderr
