"""Which guest pages the model guest hands to the balloon, in which order."""

from __future__ import annotations

import enum
import random
from array import array


class PfnOrder(enum.Enum):
    RANDOM = "random"  # random guest pages, shuffled (the default)
    LINUX = "linux"  # descending runs of consecutive PFNs, two runs interleaved, as a real guest sends
    SEQUENTIAL = "sequential"  # ascending PFNs



def allocation_order(
    pfns: range, order: PfnOrder | str, *, seed: int = 0, run_length: int = 16, block_pages: int = 512
) -> array:
    """The order in which the model guest hands pages to the balloon.

    LINUX: 2 MiB blocks from the top of memory down; two blocks at a time
    are drained in alternating descending runs of ``run_length`` pages
    (e.g. 0x3fdff..0x3fdf0, 0x3fbff..0x3fbf0, 0x3fdef..), which is how a
    real guest's buddy allocator and per-cpu lists hand out pages.
    """
    order = PfnOrder(order)
    if order is PfnOrder.SEQUENTIAL:
        return array("I", pfns)
    if order is PfnOrder.RANDOM:
        shuffled = array("I", pfns).tolist()
        random.Random(seed).shuffle(shuffled)
        return array("I", shuffled)
    result = array("I")
    first, end = pfns.start, pfns.stop
    tops = list(range(end, first, -block_pages))  # exclusive upper ends of blocks, top down
    for pair in range(0, len(tops), 2):
        blocks = [(top, max(top - block_pages, first)) for top in tops[pair : pair + 2]]
        cursors = [top for top, _ in blocks]
        while any(cursor > bottom for cursor, (_, bottom) in zip(cursors, blocks)):
            for i, (_, bottom) in enumerate(blocks):
                if cursors[i] > bottom:
                    stop = max(cursors[i] - run_length, bottom)
                    result.extend(range(cursors[i] - 1, stop - 1, -1))
                    cursors[i] = stop
    return result
