"""The host policy against 16 guests whose workloads change, under a host
budget (issue 14, item 3).

The guests here are an in-process stand-in for a back-end plus its guest,
so that 16 of them run 160 policy cycles in a fraction of a second: each
``SimGuest`` has RAM, a target, an ``actual`` that follows the target at a
balloon speed (but cannot inflate into memory its workload uses), and sends
what a Linux guest sends: available memory (= actual - used), and cumulative
swap-in and major faults that grow while its workload does not fit. The
policy under test is the real one (``vhostballoon.policy.core.Policy``), fed
``GuestFigures`` built by the same function that turns a real back-end's
``query-balloon`` reply into figures (``driver.guest_figures``), from a
reply of the same shape. tests/test_policy_backends.py runs the policy
against real back-ends over their control sockets.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhostballoon.policy.core import HostFigures, MiB, Policy, PolicyConfig
from vhostballoon.policy.driver import guest_figures

GiB = 1024 * MiB
BALLOON_SPEED = 256 * MiB  # per cycle, either way (one cycle: the policy's interval)


@dataclass
class SimGuest:
    name: str
    ram: int
    used: int  # what its workload needs now
    actual: int = 0
    target: int | None = None
    swap_in: int = 0
    major_faults: int = 0

    def __post_init__(self) -> None:
        self.actual = self.ram

    def tick(self) -> None:
        goal = self.target if self.target is not None else self.ram
        if goal < self.actual:  # inflate: the guest cannot give what its workload holds (+ 32 MiB for itself)
            self.actual = max(goal, self.actual - BALLOON_SPEED, min(self.actual, self.used + 32 * MiB))
        else:
            self.actual = min(goal, self.actual + BALLOON_SPEED)
        short = self.used + 64 * MiB - self.actual
        if short > 0:  # the workload does not fit: it swaps and faults
            self.swap_in += short
            self.major_faults += short // 4096

    def query_balloon(self) -> dict:
        """What a back-end's query-balloon carries for this guest (the fields the policy reads)."""
        return {
            "connected": True, "actual": self.actual, "target": self.target, "guest-ram-bytes": self.ram,
            "guest-stats": {"age-seconds": 1.0, "stats": {
                "stat-available-memory": max(0, self.actual - self.used), "stat-free-memory": max(0, self.actual - self.used),
                "stat-swap-in": self.swap_in, "stat-major-faults": self.major_faults}},
        }


def run(policy: Policy, guests: list[SimGuest], cycles: int, events: dict[int, list[tuple[int, int]]], floors: dict):
    """Run ``cycles`` cycles; ``events``: cycle -> [(guest index, new used)]. Returns the history."""
    host = HostFigures(mem_total=64 * GiB, mem_available=48 * GiB, psi_some_avg10=0.0)
    history = []
    for cycle in range(cycles):
        for index, used in events.get(cycle, []):
            guests[index].used = used
        figures = [guest_figures(g.name, g.query_balloon(), floors.get(g.name)) for g in guests]
        plan = policy.decide(host, figures)
        for g, d in zip(guests, plan.decisions):
            if d.changed:
                g.target = d.new_target
        for g in guests:
            g.tick()
        history.append({
            "targets": [g.target for g in guests], "actuals": [g.actual for g in guests],
            "changes": [(d.name, d.old_target, d.new_target, d.rule) for d in plan.decisions if d.changed],
            "faults": [g.major_faults for g in guests],
        })
    return history


def test_sixteen_guests_under_a_budget():
    config = PolicyConfig(budget=11 * GiB, step=128 * MiB)
    policy = Policy(config)
    # 16 guests of 1 GiB (16 GiB of RAM on an 11 GiB budget): light, medium and heavy workloads
    used = [200 * MiB] * 8 + [350 * MiB] * 4 + [600 * MiB] * 4
    guests = [SimGuest(f"vm{i:02d}", 1 * GiB, u) for i, u in enumerate(used)]
    floors = {"vm15": 900 * MiB}  # one VM with a high floor
    GROW_AT, GROWER, SHRINKER = 60, 0, 12
    events = {GROW_AT: [(GROWER, 700 * MiB), (SHRINKER, 150 * MiB)]}
    history = run(policy, guests, 160, events, floors)

    # the budget holds after the settling time, and at every cycle after it (targets and actual sizes)
    over = [c for c, h in enumerate(history) if sum(h["actuals"]) > config.budget]
    settle = (over[-1] + 1) if over else 0
    assert settle <= 8, f"settled at cycle {settle}"
    assert all(sum(t for t in h["targets"] if t is not None) <= config.budget for h in history[settle:])

    # no target under its floor, no move larger than a step, ever
    for c, h in enumerate(history):
        for name, old, new, rule in h["changes"]:
            floor = floors.get(name, config.default_floor)
            assert new >= floor, (c, name, new, floor)
            assert old is None or abs(new - old) <= config.step, (c, name, old, new)

    # the guest whose workload grows gets memory back within a bounded number of cycles:
    # its workload fits again (no new major faults) at most 6 cycles after the change
    faults = [h["faults"][GROWER] for h in history]
    fits_again = next(c for c in range(GROW_AT + 1, len(history)) if faults[c] == faults[c - 1] and all(
        faults[k] == faults[c] for k in range(c, len(history))))
    assert fits_again - GROW_AT <= 6, f"grower short for {fits_again - GROW_AT} cycles"
    assert history[-1]["actuals"][GROWER] >= 700 * MiB + 64 * MiB

    # bounded number of target changes (no flapping): each settling phase takes a bounded number,
    # and the steady state after each makes none
    changes = [len(h["changes"]) for h in history]
    first, second = sum(changes[:GROW_AT]), sum(changes[GROW_AT:])
    assert sum(changes[40:GROW_AT]) == 0 and sum(changes[GROW_AT + 40:]) == 0, changes
    assert first <= 16 * 6 and second <= 30, (first, second)
    # no guest changes direction more than twice (shrink, then grow when its workload grew)
    for i in range(16):
        moves = [new - old for h in history for name, old, new, _ in h["changes"] if name == guests[i].name and old]
        reversals = sum(1 for a, b in zip(moves, moves[1:]) if (a > 0) != (b > 0))
        assert reversals <= 1, (guests[i].name, moves)
    print(f"\nsimulation: 16 guests, budget 11 GiB: settled after {settle} cycles; "
          f"{first} target changes to settle, {second} after the workload change (grower fits again after "
          f"{fits_again - GROW_AT} cycles); floors violated 0; steps over the bound 0; "
          f"final total {sum(history[-1]['actuals']) / GiB:.2f} GiB")


def test_host_pressure_starts_and_ends_reclaim_with_hysteresis():
    policy = Policy(PolicyConfig())
    total = 64 * GiB
    g = [guest_figures(f"vm{i}", SimGuest(f"vm{i}", 4 * GiB, 1 * GiB).query_balloon()) for i in range(2)]
    low, mid, high = int(0.05 * total), int(0.15 * total), int(0.25 * total)
    plan = policy.decide(HostFigures(total, low, 0.0), g)
    assert plan.reclaim and [d.rule for d in plan.decisions] == ["shrink-host", "shrink-host"]
    assert [d.old_target - d.new_target for d in plan.decisions] == [128 * MiB, 128 * MiB]
    # between the marks: reclaim goes on (no flapping at the low mark)
    assert policy.decide(HostFigures(total, mid, 0.0), g).reclaim
    # above the high mark but PSI still high: goes on; PSI low: ends, and nothing shrinks
    assert policy.decide(HostFigures(total, high, 5.0), g).reclaim
    plan = policy.decide(HostFigures(total, high, 0.5), g)
    assert not plan.reclaim and not any(d.changed for d in plan.decisions)
    # mid again without reclaim: nothing happens (the band)
    assert not policy.decide(HostFigures(total, mid, 0.0), g).reclaim
    # PSI alone starts reclaim
    assert policy.decide(HostFigures(total, high, 25.0), g).reclaim


def test_floor_ceiling_and_stale_statistics():
    policy = Policy(PolicyConfig(budget=1 * GiB))
    guest = SimGuest("a", 2 * GiB, 100 * MiB)
    guest.target = 300 * MiB
    guest.actual = 300 * MiB
    figures = guest_figures("a", guest.query_balloon(), floor=512 * MiB, ceiling=1536 * MiB)
    d = policy.decide(HostFigures(64 * GiB, 48 * GiB), [figures]).decisions[0]
    assert (d.rule, d.new_target) == ("bounds", 512 * MiB)  # under the floor: brought up at once
    reply = SimGuest("b", 2 * GiB, 100 * MiB).query_balloon()
    reply["guest-stats"]["age-seconds"] = 120.0
    d = policy.decide(HostFigures(64 * GiB, 48 * GiB), [guest_figures("b", reply)]).decisions[0]
    assert (d.rule, d.changed, d.reasons) == ("hold", False, ["no fresh statistics"])
    off = policy.decide(HostFigures(64 * GiB, 48 * GiB), [guest_figures("c", {"connected": False})]).decisions[0]
    assert (off.rule, off.changed) == ("skip", False)
