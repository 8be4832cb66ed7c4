"""Straight-line update functions for ``values.Samples``: the store loop unrolled, buckets by comparisons.

A request updates a dozen values. Written as a loop, each one pays for the
loop itself (iteration, unpacking, a test for "is this a histogram"), and each
histogram observation pays for ``bisect_left`` (a C call whose float
comparisons go through the generic protocol). Together that is more than the
stores cost. Here a Samples' plan, the shape of which (per child: a counter or
gauge, or a histogram and its upper bounds) is known when it is bound, is
turned into Python source once per shape:

    def update(a0, a1):
        ... lock taken, fast case checked ...
        t0._value = v = t0._value + a0          # a counter: add, store
        d0[s0] = v
        t1._value = v = t1._value + a1          # a histogram: its sum...
        d1[s1] = v
        if a1 <= 0.1:                           # ...and its bucket, by comparisons
            ...                                 # against the bounds as constants
                j = 1
        if j is not None:
            b = k1[j]
            b._value = v = b._value + 1.0
            d1[ks1[j]] = v

The bucket is the first upper bound not below the amount, as in
prometheus-client's ``Histogram.observe``; NaN is in no bucket (every
comparison is false, so it reaches the last leaf, which tests ``<= inf``).
``tests/test_values.py`` checks the result against the loop in ``values.py``
(still the path for first use, forks and values held in memory) and against
stock prometheus-client.

The function holds each value's file view (``d0``) and slot (``s0``), as they
were when it was made. A file that grows is remapped (its old view released),
and a value may move to another file after a fork or a fault: each of those
replaces the process's ``layout`` token, and a function made under another token
hands the update to ``samples._update_slow`` (the reference loop, which reads
files and slots anew and then makes the function again). So does any update
while values are held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable

# One factory per plan shape (None for a counter or gauge | a histogram's upper bounds, ...).
_factories: dict[tuple, Callable] = {}


def compile_update(samples, plan: tuple, current, layout: object) -> Callable[..., None]:
    """The update function for `samples`, whose direct plan is `plan` ((total, bounds, buckets) per child).

    The function writes through each value's current file view and slot, taken
    now; it takes the slow path (``samples._update_slow``) whenever the
    process's ``layout`` is not `layout` (another process, a remapped file, a
    moved value; None: always) or values are held in memory. `current` holds
    this process's value store state as ``current.process`` (replaced in a
    forked child); the function reads it at each call. The generated code sees
    nothing else: its globals are empty.
    """
    shape = tuple(bounds for _, bounds, _ in plan)
    factory = _factories.get(shape)
    if factory is None:
        code = compile(_source(shape), f"<promfork update {len(shape)} values>", "exec")
        scope: dict = {}
        exec(code, {"__builtins__": {}}, scope)  # noqa: S102 - source built here from numbers only
        factory = _factories[shape] = scope["make"]
    if any(bucket._file is not total._file for total, _, buckets in plan for bucket in buckets):
        layout = None  # never seen (a histogram's values share one file): the slow path, always
    objects: list = [current, samples, layout]
    for total, bounds, buckets in plan:
        file = total._file
        objects += (total, None if file is None else file.doubles, total._slot)
        if bounds is not None:  # a histogram's buckets live in its sum's file
            objects += (buckets, tuple(bucket._slot for bucket in buckets))
    return factory(*objects)


def _source(shape: tuple) -> str:
    params, amounts = ["current", "samples", "layout"], []
    for i, bounds in enumerate(shape):
        params += [f"t{i}", f"d{i}", f"s{i}"]
        if bounds is not None:
            params += [f"k{i}", f"ks{i}"]
        amounts.append(f"a{i}")
    args = ", ".join(amounts)
    packed = f"({args},)" if amounts else "()"
    lines = [
        f"def make({', '.join(params)}):",
        f"    def update({args}):",
        "        process = current.process",
        "        lock = process.lock",
        "        lock.acquire()",
        "        try:",
        "            if process.layout is not layout or process.unstored:",
        f"                samples._update_slow(process, {packed})",
        "                return",
    ]
    body = "            "
    for i, bounds in enumerate(shape):
        lines += [
            f"{body}t{i}._value = v = t{i}._value + a{i}",
            f"{body}d{i}[s{i}] = v",
        ]
        if bounds is None:
            continue
        _search(lines, f"a{i}", bounds, 0, len(bounds) - 1, body)
        lines += [
            f"{body}if j is not None:",
            f"{body}    b = k{i}[j]",
            f"{body}    b._value = v = b._value + 1.0",
            f"{body}    d{i}[ks{i}[j]] = v",
        ]
    lines += [
        "        finally:",
        "            lock.release()",
        "    return update",
    ]
    return "\n".join(lines) + "\n"


def _search(lines: list[str], amount: str, bounds: tuple, low: int, high: int, indent: str) -> None:
    """Append code setting ``j`` to the first index in low..high whose bound is >= `amount` (None for NaN)."""
    if low == high:
        if high == len(bounds) - 1:  # the +Inf bucket: every number, but not NaN
            lines.append(f"{indent}j = {high} if {amount} <= {_literal(bounds[high])} else None")
        else:
            lines.append(f"{indent}j = {high}")
        return
    middle = (low + high) // 2
    lines.append(f"{indent}if {amount} <= {_literal(bounds[middle])}:")
    _search(lines, amount, bounds, low, middle, indent + "    ")
    lines.append(f"{indent}else:")
    _search(lines, amount, bounds, middle + 1, high, indent + "    ")


def _literal(bound: float) -> str:
    """`bound` as Python source that evaluates to exactly it (repr round-trips floats)."""
    bound = float(bound)
    if math.isinf(bound):
        return "1e999" if bound > 0 else "-1e999"  # literals that overflow to ±inf
    if math.isnan(bound):
        raise ValueError("a histogram bound cannot be NaN")
    if bound.is_integer():
        # The same comparison for any amount (Python compares int and float exactly), and a
        # cheap one for the integer amounts (tokens, bytes) such buckets usually count.
        return repr(int(bound))
    return repr(bound)
