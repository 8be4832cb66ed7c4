"""Driving the load: send the mix with an async client and record what came back.

Clients keep `concurrency` requests in flight until a count or a duration is
reached. Alongside them, when asked: a killer SIGKILLs a random worker every S
seconds, a reloader HUPs the master, a watcher scrapes /metrics and notes any
counter that went down, and a progress line is drawn on stderr. The result is a
Tally; judging it is the verdict's business.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass

from promfork.loadtest.mix import RequestMix, RequestSpec
from promfork.loadtest.scrape import monotonic_samples
from promfork.loadtest.server import GunicornServer
from promfork.loadtest.tally import Outcome, Tally


@dataclass
class Load:
    """What to send: the mix, how many at once, and for how long (a count, a duration, or both)."""

    mix: RequestMix
    concurrency: int = 32
    total: int | None = 2000
    duration: float | None = None


@dataclass
class Disruption:
    """What to do to a started server meanwhile: kill a worker / reload the master every so many seconds."""

    server: GunicornServer | None = None
    kill_every: float | None = None
    hup_every: float | None = None


async def send(session, base: str, spec: RequestSpec) -> Outcome:
    """Send one request and read the whole response; a failure is recorded, never raised."""
    import aiohttp

    outcome = Outcome(spec.kind, spec.method, spec.route, spec.status, started=time.perf_counter(), model=spec.model)
    headers = {"Content-Type": "application/json"} if spec.body is not None else None
    try:
        async with session.request(spec.method, base + spec.path, data=spec.body, headers=headers) as resp:
            outcome.status = resp.status
            raw = await resp.read()
        read_usage(outcome, spec, raw)
    except (aiohttp.ClientError, TimeoutError):
        pass  # refused, reset or cut: not complete
    outcome.ended = time.perf_counter()
    return outcome


def read_usage(outcome: Outcome, spec: RequestSpec, raw: bytes) -> None:
    """Mark `outcome` complete when `raw` is a whole answer, with the usage it reports."""
    if outcome.status != 200 or not spec.usage:
        outcome.complete = True
        return
    try:
        if not spec.stream:
            usage = json.loads(raw)["usage"]
        else:
            events = [b[6:] for b in raw.decode().split("\n\n") if b.startswith("data: ")]
            if len(events) < 2 or events[-1] != "[DONE]":
                return  # cut short or ended by an error event: tokens unknown to the client
            usage = json.loads(events[-2])["usage"]
        prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        return  # not the answer it should be
    outcome.prompt_tokens, outcome.completion_tokens = prompt, completion
    outcome.cached_tokens, outcome.reasoning_tokens = cached, reasoning
    outcome.complete = True


async def drive(
    base: str,
    load: Load,
    tally: Tally,
    disruption: Disruption | None = None,
    *,
    metrics_url: str | None = None,
    token: str | None = None,
    progress: bool = False,
) -> float:
    """Send `load` at `base` into `tally`, disrupting and watching as asked; return elapsed seconds."""
    import aiohttp

    disruption = disruption or Disruption()
    server = disruption.server
    timeout = aiohttp.ClientTimeout(total=120)
    metrics_headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(limit=load.concurrency, force_close=False)
    started = time.perf_counter()
    deadline = started + load.duration if load.duration else None
    issued = 0

    def more() -> bool:
        nonlocal issued
        if (load.total is not None and issued >= load.total) or (
            deadline is not None and time.perf_counter() >= deadline
        ):
            return False
        issued += 1
        return True

    async def client(session):
        while more():
            tally.outcomes.append(await send(session, base, load.mix.next()))

    async def killer():
        rng = random.Random(7)  # noqa: S311 (picks a victim, not a secret)
        while True:
            await asyncio.sleep(disruption.kill_every)
            try:
                server.kill_worker(rng.choice(server.worker_pids()))
                tally.kills.append(time.perf_counter())
            except (IndexError, OSError):
                continue

    async def reloader():
        while True:
            await asyncio.sleep(disruption.hup_every)
            server.reload()
            tally.reloads += 1

    async def watcher(session):
        # Scrape during the run: no counter may ever be lower than in the scrape before.
        previous: dict = {}
        while True:
            await asyncio.sleep(0.5)
            try:
                async with session.get(metrics_url, headers=metrics_headers) as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError):
                continue
            current = monotonic_samples(text)
            tally.scrapes += 1
            for key, old in previous.items():
                new = current.get(key)
                if new is None or new < old:
                    tally.went_backwards.append(f"{key}: {old} -> {new}")
            previous = current

    async def reporter():
        while True:
            await asyncio.sleep(0.5)
            progress_line(tally, time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        side = []
        if disruption.kill_every and server is not None:
            side.append(asyncio.create_task(killer()))
        if disruption.hup_every and server is not None:
            side.append(asyncio.create_task(reloader()))
        if progress:
            side.append(asyncio.create_task(reporter()))
        if metrics_url:
            side.append(asyncio.create_task(watcher(session)))
        await asyncio.gather(*(client(session) for _ in range(load.concurrency)))
        for task in side:
            task.cancel()
    elapsed = time.perf_counter() - started
    if progress:
        progress_line(tally, elapsed)
        print(file=sys.stderr)
    return elapsed


def run(base: str, load: Load, tally: Tally, disruption: Disruption | None = None, **watch) -> float:
    """`drive` to the end; also records the CPU the client used (tally.client_cpu_s). Returns elapsed seconds."""
    cpu_before = time.process_time()
    elapsed = asyncio.run(drive(base, load, tally, disruption, **watch))
    tally.client_cpu_s = time.process_time() - cpu_before
    return elapsed


def progress_line(tally: Tally, elapsed: float) -> None:
    """Redraw the live progress line on stderr."""
    done = len(tally.outcomes)
    failed = sum(1 for o in tally.outcomes if not o.complete)
    rate = done / elapsed if elapsed else 0.0
    line = f"\r  {done:>8,} done  {rate:>8,.0f} req/s  {failed:>5} failed  {len(tally.kills):>3} workers killed"
    print(line, end="", file=sys.stderr, flush=True)
