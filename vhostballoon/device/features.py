"""virtio-balloon feature bits and queue roles.

Sources: virtio 1.2 spec, 5.5.3 "Feature bits" and 6 "Reserved Feature Bits";
Linux include/uapi/linux/virtio_balloon.h, drivers/virtio/virtio_balloon.c
(init_vqs) for the packed queue indices.
"""

from __future__ import annotations

import enum


class BalloonFeature(enum.IntFlag):
    MUST_TELL_HOST = 1 << 0  # tell the host before using a deflated page
    STATS_VQ = 1 << 1  # statistics virtqueue present
    DEFLATE_ON_OOM = 1 << 2  # guest deflates by itself under memory pressure
    FREE_PAGE_HINT = 1 << 3  # free page hinting virtqueue (migration aid)
    PAGE_POISON = 1 << 4  # guest poisons free pages; config poison_val valid
    REPORTING = 1 << 5  # free page reporting virtqueue
    # Experimental, this project's (protocol/range-balloon.md): the
    # range-inflate and range-deflate queues, whose descriptors are ranges.
    # Bit 60: the upper device-specific range (50-127, virtio 1.2 section 6),
    # clear of the low bits that upstream and other proposals use (0-8).
    RANGES = 1 << 60


class RingFeature(enum.IntFlag):
    INDIRECT_DESC = 1 << 28  # virtio 1.2, 6: VIRTIO_F_INDIRECT_DESC
    EVENT_IDX = 1 << 29  # virtio 1.2, 6: VIRTIO_F_EVENT_IDX
    VERSION_1 = 1 << 32  # virtio 1.2, 6: VIRTIO_F_VERSION_1 (QEMU's test device is modern-only)


_FEATURE_NAMES = {
    **{int(f): f"balloon:{f.name.lower()}" for f in BalloonFeature},
    **{int(f): f"ring:{f.name.lower()}" for f in RingFeature},
}

# The balloon features this back-end implements, by the names operators use
# (``--features``).  FREE_PAGE_HINT (a migration aid) is not implemented and
# never offered.
FEATURE_FLAGS: dict[str, BalloonFeature] = {
    "must-tell-host": BalloonFeature.MUST_TELL_HOST,
    "stats": BalloonFeature.STATS_VQ,
    "oom": BalloonFeature.DEFLATE_ON_OOM,
    "poison": BalloonFeature.PAGE_POISON,
    "reporting": BalloonFeature.REPORTING,
    "ranges": BalloonFeature.RANGES,
}
FEATURE_ALIASES = {
    "stats-vq": "stats",
    "deflate-on-oom": "oom",
    "page-poison": "poison",
    "free-page-reporting": "reporting",
    "range-balloon": "ranges",
}
IMPLEMENTED_FEATURES = int(sum(FEATURE_FLAGS.values(), BalloonFeature(0)))

# Always offered: the ring layout the walker implements, and VERSION_1 (QEMU's
# vhost-user test device is modern-only).
RING_FEATURES = int(RingFeature.INDIRECT_DESC | RingFeature.EVENT_IDX | RingFeature.VERSION_1)

# What this back-end offers unless told otherwise: everything it implements.
DEFAULT_FEATURES = IMPLEMENTED_FEATURES | RING_FEATURES


class FeatureSpecError(ValueError):
    """A --features value that does not parse."""


def parse_feature_spec(spec: str) -> int:
    """The feature bits an operator's ``--features`` value asks to offer.

    Comma-separated tokens, applied left to right: ``all`` (every
    implemented feature), ``none``, ``NAME`` or ``+NAME`` (add), ``-NAME``
    (remove).  A value that starts with a removal starts from ``all``; one
    that starts with a name starts from ``none``.  So ``stats,reporting``
    offers exactly those two, ``-reporting`` everything but reporting.
    The ring features (VERSION_1, EVENT_IDX, INDIRECT_DESC) are always offered.
    """
    tokens = [t.strip().lower() for t in spec.split(",")]
    if not spec.strip() or any(not t for t in tokens):
        raise FeatureSpecError(f"--features {spec!r}: empty item (expected e.g. 'all', 'stats,reporting', '-poison')")
    balloon = IMPLEMENTED_FEATURES if tokens[0].startswith("-") else 0
    for token in tokens:
        if token in ("all", "none"):
            balloon = IMPLEMENTED_FEATURES if token == "all" else 0
            continue
        sign, name = (token[0], token[1:]) if token[0] in "+-" else ("+", token)
        name = FEATURE_ALIASES.get(name, name)
        if name not in FEATURE_FLAGS:
            hint = " (free page hinting is not implemented)" if name in ("free-page-hint", "hint") else ""
            known = ", ".join(["all", "none", *FEATURE_FLAGS])
            raise FeatureSpecError(f"--features {spec!r}: unknown feature {name!r}{hint}; known: {known}")
        bit = int(FEATURE_FLAGS[name])
        balloon = balloon | bit if sign == "+" else balloon & ~bit
    return balloon | RING_FEATURES


def feature_flag_names(features: int) -> list[str]:
    """The ``--features`` names of the balloon bits set in features."""
    return [name for name, bit in FEATURE_FLAGS.items() if features & bit]


def feature_names(features: int) -> list[str]:
    """Names of the set bits, unknown bits as ``bit:N``."""
    names = []
    for bit in range(64):
        if features & (1 << bit):
            names.append(_FEATURE_NAMES.get(1 << bit, f"bit:{bit}"))
    return names
