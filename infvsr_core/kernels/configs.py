"""Block configurations tried in order, per kernel and shape: the first that launches is kept.

Why: how large a Triton block a GPU takes depends on its shared memory (an
Hopper has more than most consumer cards), and a launch that does not fit fails
at compile time, before anything runs. Trying the fastest configuration
first and falling back keeps one code path for every GPU; a shape that no
configuration fits is remembered, and its caller takes its own plain path
from then on (that kernel only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def first_that_runs(
    key: Any, configs: Sequence[Any], launch: Callable[[Any], None], chosen: dict, failures: list[str]
) -> bool:
    """launch(config) for configs from the one kept for `key` on; True once one ran (kept in `chosen[key]`).

    False when none runs (remembered as -1: not tried again); each failure's
    reason goes to `failures`.
    """
    start = chosen.get(key, 0)
    if start < 0:
        return False
    for index in range(start, len(configs)):
        try:
            launch(configs[index])
        except Exception as error:  # too little shared memory for these blocks (or no compiler): the next ones
            failures.append(f"{configs[index]}: {type(error).__name__}: {error}"[:300])
            continue
        chosen[key] = index
        return True
    chosen[key] = -1
    return False
