"""``vhostballoon-policy``: the host's balloon policy over every back-end's
control socket. ``core``: the rules (pure); ``driver``: sockets and /proc;
``cli``: the command."""

from .core import Decision, GuestFigures, HostFigures, Plan, Policy, PolicyConfig

__all__ = ["Decision", "GuestFigures", "HostFigures", "Plan", "Policy", "PolicyConfig"]
