"""The host policy's rules, as a pure object: figures in, targets and reasons out.

No socket, no file, no clock: ``Policy.decide(host, guests)`` takes what the
driver (``policy.driver``) read from ``/proc`` and the back-ends' control
sockets and returns one ``Decision`` per guest. It keeps, between calls, only
what the rules need to remember: the guests' previous cumulative counters
(to see swap-in, major faults, OOM kills and allocation stalls *grow*), the
cycle of each guest's last change (cool-down), and whether the host is in
reclaim (hysteresis). The README's "Host policy" section states these rules
in words; each rule here carries the name the decisions log.

Reference: oVirt MoM's balloon policy (shrink guests while host free memory
is under a threshold, keep each guest a share of its memory free, bounded
steps, grow a guest that runs short).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1 << 20
ALIGN = MiB  # targets are whole MiB


@dataclass(frozen=True)
class PolicyConfig:
    step: int = 128 * MiB  # the most a target moves in one cycle, either way
    min_step: int = 8 * MiB  # smaller moves are not worth a change (churn)
    keep_free_share: float = 0.20  # a guest keeps this share of its size available ...
    keep_free_min: int = 128 * MiB  # ... and never less than this
    hysteresis: float = 0.5  # shrink only while available > keep * (1 + hysteresis)
    default_floor: int = 256 * MiB
    host_low_share: float = 0.10  # host reclaim starts under this share of MemTotal available ...
    host_high_share: float = 0.20  # ... and ends above this one
    psi_high: float = 10.0  # ... or when /proc/pressure/memory "some avg10" exceeds this (%)
    psi_low: float = 2.0  # (and reclaim ends only below this)
    budget: int | None = None  # sum of guest targets the host allows (None: no budget)
    cooldown: int = 3  # cycles after a grow during which the guest is not shrunk
    majflt_per_cycle: int = 1000  # major faults per cycle that count as pressure
    stale_after: float = 30.0  # statistics older than this (s) are not trusted for shrinking

    def __post_init__(self) -> None:
        if self.step < self.min_step or self.min_step <= 0:
            raise ValueError(f"step {self.step} must be >= min_step {self.min_step} > 0")
        if not 0 <= self.keep_free_share < 1:
            raise ValueError(f"keep_free_share {self.keep_free_share} must be in [0, 1)")
        if not 0 <= self.host_low_share <= self.host_high_share < 1:
            raise ValueError(f"need 0 <= host_low_share ({self.host_low_share}) <= host_high_share ({self.host_high_share}) < 1")
        if self.psi_low > self.psi_high:
            raise ValueError(f"psi_low {self.psi_low} must not exceed psi_high {self.psi_high}")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"budget {self.budget} must be > 0")


@dataclass(frozen=True)
class HostFigures:
    mem_total: int
    mem_available: int
    psi_some_avg10: float | None = None  # None: no /proc/pressure/memory


@dataclass(frozen=True)
class GuestFigures:
    """One back-end's figures (query-balloon), under the VM's name."""

    name: str
    connected: bool
    ram: int = 0
    actual: int = 0
    target: int | None = None
    available: int | None = None  # stat-available-memory, else free + caches, else free
    stats_age: float | None = None
    swap_in: int | None = None  # cumulative, bytes
    major_faults: int | None = None  # cumulative
    oom_kills: int | None = None  # cumulative (Linux 6.12)
    alloc_stalls: int | None = None  # cumulative (Linux 6.12)
    floor: int | None = None  # None: the config's default floor
    ceiling: int | None = None  # None: guest RAM


@dataclass
class Decision:
    name: str
    old_target: int | None
    new_target: int | None
    rule: str  # grow-pressure, grow-short, shrink-budget, shrink-host, hold, skip
    reasons: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.new_target is not None and self.new_target != self.old_target


@dataclass
class Plan:
    decisions: list[Decision]
    reclaim: bool  # the host is in reclaim (hysteresis state after this cycle)
    host_reasons: list[str]
    total_target: int  # sum of the new targets of the connected guests


def _align_down(value: int) -> int:
    return value - value % ALIGN


def _align_up(value: int) -> int:
    return -(-value // ALIGN) * ALIGN


class Policy:
    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.cycle = 0
        self.reclaim = False
        self._counters: dict[str, tuple[int | None, int | None, int | None, int | None]] = {}
        self._last_grow: dict[str, int] = {}

    # -- per guest ---------------------------------------------------------------------

    def keep(self, actual: int) -> int:
        """What a guest keeps available: a share of its size, at least keep_free_min."""
        return max(self.config.keep_free_min, int(self.config.keep_free_share * actual))

    def _pressure(self, g: GuestFigures) -> list[str]:
        """Signs of memory pressure since the previous cycle."""
        previous = self._counters.get(g.name)
        now = (g.swap_in, g.major_faults, g.oom_kills, g.alloc_stalls)
        self._counters[g.name] = now
        if previous is None:
            return []
        signs = []
        labels = ("swap-in bytes", "major faults", "OOM kills", "allocation stalls")
        limits = (0, self.config.majflt_per_cycle, 0, 0)
        for label, before, after, limit in zip(labels, previous, now, limits):
            if before is not None and after is not None and after - before > limit:
                signs.append(f"{label} +{after - before}")
        return signs

    # -- one cycle ---------------------------------------------------------------------

    def decide(self, host: HostFigures, guests: list[GuestFigures]) -> Plan:
        cfg = self.config
        self.cycle += 1
        host_reasons = self._host_state(host)
        decisions: dict[str, Decision] = {}
        live: list[GuestFigures] = []
        for g in guests:
            if not g.connected or not g.ram:
                decisions[g.name] = Decision(g.name, g.target, g.target, "skip", ["no guest connected"])
                continue
            live.append(g)
        targets = {g.name: (g.target if g.target is not None else g.ram) for g in live}
        targets = {name: min(t, next(g.ram for g in live if g.name == name)) for name, t in targets.items()}
        floors = {g.name: min(g.floor if g.floor is not None else cfg.default_floor, g.ram) for g in live}
        ceilings = {g.name: max(min(g.ceiling if g.ceiling is not None else g.ram, g.ram), floors[g.name]) for g in live}

        # Rule 0: a target outside [floor, ceiling] is brought inside at once.
        wants: dict[str, tuple[int, str, list[str]]] = {}
        donors: dict[str, tuple[int, list[str]]] = {}
        for g in live:
            t, lo, hi = targets[g.name], floors[g.name], ceilings[g.name]
            if t < lo or t > hi:
                new = min(max(t, lo), hi)
                decisions[g.name] = Decision(g.name, g.target, new, "bounds",
                                             [f"target {t} outside [floor {lo}, ceiling {hi}]"])
                targets[g.name] = new
                continue
            signs = self._pressure(g)
            keep = self.keep(g.actual)
            fresh = g.available is not None and g.stats_age is not None and g.stats_age <= cfg.stale_after
            settled = abs(g.actual - t) < cfg.step // 2
            room_up = hi - t
            # Rule 1: a guest under pressure grows by up to one step.
            if signs and room_up >= cfg.min_step:
                wants[g.name] = (min(cfg.step, room_up), "grow-pressure", signs)
                continue
            # Rule 2: a guest with less available than it should keep grows toward it.
            if fresh and g.available < keep and room_up >= cfg.min_step:
                need = _align_up(keep - g.available)
                wants[g.name] = (min(cfg.step, room_up, max(need, cfg.min_step)), "grow-short",
                                 [f"available {g.available} < keep {keep}"])
                continue
            # Candidates to give: fresh statistics, settled, surplus beyond the hysteresis band,
            # not grown during the cool-down, above the floor.
            reasons = []
            if not fresh:
                reasons.append("no fresh statistics")
            elif not settled:
                reasons.append(f"still moving (actual {g.actual}, target {t})")
            elif self.cycle - self._last_grow.get(g.name, -10**9) <= cfg.cooldown:
                reasons.append(f"grown {self.cycle - self._last_grow[g.name]} cycle(s) ago (cool-down {cfg.cooldown})")
            else:
                surplus = g.available - int(keep * (1 + cfg.hysteresis))
                give = _align_down(min(cfg.step, surplus, t - lo))
                if give >= cfg.min_step:
                    donors[g.name] = (give, [f"available {g.available} > keep {keep} x {1 + cfg.hysteresis:g}"])
                    continue
                reasons.append("at its floor" if t - lo < cfg.min_step else f"available {g.available} within the band (keep {keep})")
            decisions[g.name] = Decision(g.name, g.target, t, "hold", reasons)

        # How much the guests must give: the budget's excess (with the wants counted), and the
        # host's shortfall while in reclaim (aiming at the high mark: hysteresis).
        total = sum(targets.values())
        want_total = sum(w for w, _, _ in wants.values())
        need = 0
        need_reasons = []
        shrink_rule = "shrink-budget"
        if cfg.budget is not None and total + want_total > cfg.budget:
            need = total + want_total - cfg.budget
            need_reasons.append(f"budget: targets {total} + wanted {want_total} > budget {cfg.budget}")
        if self.reclaim:
            shortfall = int(cfg.host_high_share * host.mem_total) - host.mem_available
            if shortfall > need:
                need = shortfall
                shrink_rule = "shrink-host"
                need_reasons = [f"host reclaim: MemAvailable {host.mem_available} under the high mark by {shortfall}"]
        # Rule 3: donors give in proportion to their surplus, each at most one step, never under its floor.
        give_total = sum(g for g, _ in donors.values())
        scale = min(1.0, need / give_total) if give_total else 0.0
        given = 0
        for name, (give, reasons) in donors.items():
            # a share rounded up to min_step, so that a small excess is still met
            amount = min(give, max(cfg.min_step, _align_up(int(give * scale)))) if need > given else 0
            if amount >= cfg.min_step:
                new = targets[name] - amount
                decisions[name] = Decision(name, targets[name], new, shrink_rule, reasons + need_reasons)
                targets[name] = new
                given += amount
            else:
                decisions[name] = Decision(name, targets[name], targets[name], "hold",
                                           reasons + ["nothing needed from it" if not need else "its share is under min_step"])
        # Rule 4: wants are met within what the budget leaves (pressure first, then the
        # shortest); in host reclaim, only pressure grows a guest, and by no more than was given.
        room = cfg.budget - sum(targets.values()) if cfg.budget is not None else None
        if self.reclaim:
            room = given if room is None else min(room, given)
        order = sorted(wants.items(), key=lambda kv: (kv[1][1] != "grow-pressure", -kv[1][0]))
        for name, (want, rule, reasons) in order:
            if self.reclaim and rule != "grow-pressure":
                decisions[name] = Decision(name, targets[name], targets[name], "hold", reasons + ["host in reclaim"])
                continue
            amount = want if room is None else _align_down(min(want, max(room, 0)))
            if amount >= cfg.min_step:
                decisions[name] = Decision(name, targets[name], targets[name] + amount, rule, reasons)
                targets[name] += amount
                self._last_grow[name] = self.cycle
                if room is not None:
                    room -= amount
            else:
                decisions[name] = Decision(name, targets[name], targets[name], "hold", reasons + ["no room in the budget"])
        # a guest left where it was keeps its target as it was (none stays none)
        for g in live:
            d = decisions[g.name]
            if d.new_target == (g.target if g.target is not None else g.ram):
                d.old_target = d.new_target = g.target
        ordered = [decisions[g.name] for g in guests]
        return Plan(ordered, self.reclaim, host_reasons, sum(targets.values()))

    def _host_state(self, host: HostFigures) -> list[str]:
        """Enter reclaim under the low mark (or over psi_high); leave it only above the
        high mark and under psi_low."""
        cfg = self.config
        low, high = int(cfg.host_low_share * host.mem_total), int(cfg.host_high_share * host.mem_total)
        psi = host.psi_some_avg10
        reasons = []
        if not self.reclaim:
            if host.mem_available < low:
                reasons.append(f"MemAvailable {host.mem_available} < low mark {low}")
            if psi is not None and psi > cfg.psi_high:
                reasons.append(f"memory PSI some avg10 {psi} > {cfg.psi_high}")
            self.reclaim = bool(reasons)
        else:
            if host.mem_available > high and (psi is None or psi < cfg.psi_low):
                self.reclaim = False
                reasons.append(f"reclaim over: MemAvailable {host.mem_available} > high mark {high}")
            else:
                reasons.append(f"reclaim goes on: MemAvailable {host.mem_available} (high mark {high}), PSI {psi}")
        return reasons


__all__ = ["Decision", "GuestFigures", "HostFigures", "MiB", "Plan", "Policy", "PolicyConfig"]
