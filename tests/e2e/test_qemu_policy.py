"""vhostballoon-policy with two real QEMU guests of 1 GiB, each with its own
back-end process (issue 14, item 3): guest A fills 600 MiB, B stays idle;
under a budget below 2 GiB the policy shrinks B and keeps A. Then A frees
its memory and B fills: memory moves back to B, taken from A. Prints how
long each move took."""

from __future__ import annotations

import json
import subprocess
import sys
import time


from vhostballoon.testing.qemu import balloon_guest

MiB = 1 << 20
BUDGET = 1600 * MiB
# keep 30 % available; shrink only above 45 % (hysteresis 0.5): A, with 600 MiB
# in a tmpfs, has ~320 MiB available and is never a donor; B, idle, is.
POLICY_ARGS = ["--budget", "1600M", "--step", "128M", "--keep-free", "0.3", "--hysteresis", "0.5",
               "--default-floor", "256M"]


def available(info: dict) -> int | None:
    return ((info.get("guest-stats") or {}).get("stats") or {}).get("stat-available-memory")


async def test_policy_moves_memory_between_two_real_guests(tmp_path, backend_factory):
    a = backend_factory("a", "--stats-interval", "1", "--state-dir", "none")
    b = backend_factory("b", "--stats-interval", "1", "--state-dir", "none")
    policy_log = tmp_path / "policy.log"
    async with balloon_guest(tmp_path, a.socket_path, name="guest-a") as guest_a, \
            balloon_guest(tmp_path, b.socket_path, name="guest-b") as guest_b:
        assert (await guest_a.run("fill 600", timeout=180)).rc == 0
        await a.wait_for(lambda i: (available(i) or 1 << 40) < 500 * MiB, 60, "A's statistics to show the fill")
        await b.wait_for(lambda i: (available(i) or 0) > 700 * MiB, 60, "B's statistics")
        with open(policy_log, "wb") as log:
            policy = subprocess.Popen(
                [sys.executable, "-m", "vhostballoon.policy.cli", "run", "--sockets", f"{tmp_path}/*.sock.ctl",
                 *POLICY_ARGS, "--interval", "1"], stdout=log, stderr=subprocess.STDOUT)
        try:
            # move 1: B shrinks until both guests fit the budget; A is kept
            started = time.monotonic()
            info_b = await b.wait_for(
                lambda i: i["actual"] is not None and i["target"] is not None and i["actual"] == i["target"]
                and i["actual"] + 1024 * MiB <= BUDGET, 240, "B to shrink under the budget")
            move1 = time.monotonic() - started
            info_a = await a.query()
            assert info_a["actual"] == 1024 * MiB and info_a["target"] is None, info_a
            shrunk_b = info_b["actual"]
            assert 256 * MiB <= shrunk_b <= BUDGET - 1024 * MiB
            assert (await guest_b.vmstat())["balloon_inflate"] > 0

            # move 2: A frees, B fills: memory goes back to B, taken from A
            assert (await guest_a.run("unfill", timeout=120)).rc == 0
            # B keeps ~70 MiB available: it grows until 30 % of its size is available again (~+140 MiB)
            started = time.monotonic()  # from the start of B's fill (the policy acts while B fills)
            assert (await guest_b.run(f"fill {shrunk_b // MiB - 150}", timeout=180)).rc == 0
            info_b = await b.wait_for(lambda i: i["actual"] >= shrunk_b + 96 * MiB, 240, "B to get memory back")
            move2 = time.monotonic() - started
            info_a = await a.query()
            assert info_a["target"] is not None and info_a["target"] < 1024 * MiB, info_a
            # the budget holds throughout, targets included
            assert info_a["target"] + info_b["target"] <= BUDGET
        finally:
            policy.terminate()
            policy.wait(timeout=20)
    decisions = [json.loads(line) for line in policy_log.read_text().splitlines() if line.startswith("{")]
    changes = [d for d in decisions if d.get("event") == "decision" and d.get("change")]
    assert all(abs(d["change"]) <= 128 * MiB for d in changes)
    assert all(d["new_target"] >= 256 * MiB for d in changes)
    print(f"\ntwo real guests, budget 1600 MiB: B shrank 1024 -> {shrunk_b // MiB} MiB in {move1:.1f} s (A kept at "
          f"1024 MiB); after A freed and B started to fill, B grew to {info_b['actual'] // MiB} MiB in {move2:.1f} s, "
          f"A's target {info_a['target'] // MiB} MiB; {len(changes)} target changes")
