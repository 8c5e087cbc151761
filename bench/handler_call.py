"""`python -m bench.handler_call`: what the guard around each handler call costs (`processors/handlers.py`:
its own task, the time limit, the blocked-handler guard, the copy of the event), against calling the same
empty handler directly, in the same run. Best of several rounds, microseconds per call."""

from __future__ import annotations

import argparse
import asyncio
import time
from types import SimpleNamespace

from psycopg.pq import TransactionStatus
from rich.table import Table

from bench.common import console
from sentpipe.processors.handlers import HandlerContext, HandlerRegistry
from sentpipe.schemas.events import CanonicalEvent, EventType, frame, normalize
from sentpipe.schemas.samples import SampleFactory


class _Open:
    """The batch's connection as the guard sees it after a call: open, in its transaction."""

    closed = broken = False
    info = SimpleNamespace(transaction_status=TransactionStatus.INTRANS)


async def _empty(event: CanonicalEvent, ctx: HandlerContext) -> None:
    return None


async def _per_call_us(fn: object, event: CanonicalEvent, ctx: HandlerContext, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        await fn(event, ctx)  # type: ignore[operator]
    return (time.perf_counter() - t0) / calls * 1e6


async def measure(rounds: int, calls: int) -> tuple[float, float]:
    registry = HandlerRegistry()
    registry.register(EventType.MESSAGE_INBOUND, _empty, "empty")
    guarded = registry.for_type(EventType.MESSAGE_INBOUND)[0][1]
    body = SampleFactory(1).inbound().body
    event = normalize(frame(body, webhook_id=None), tenant="t", received_at_ms=1_700_000_000_000)
    ctx = HandlerContext(_Open(), None, 1)  # type: ignore[arg-type]
    direct, through = [], []
    with console.status("calling") as status:
        for n in range(rounds):  # alternated: drift on a shared host hits both alike
            status.update(f"round {n + 1} of {rounds}")
            direct.append(await _per_call_us(_empty, event, ctx, calls))
            through.append(await _per_call_us(guarded, event, ctx, calls))
    return min(direct), min(through)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.handler_call", description=__doc__)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=20_000)
    args = p.parse_args()
    direct, guarded = asyncio.run(measure(args.rounds, args.calls))
    table = Table("call", "us per call (best round)", "ratio", title="handler call, empty handler")
    table.add_row("direct (reference)", f"{direct:.2f}", "1.00")
    table.add_row("through the guard", f"{guarded:.2f}", f"{guarded / direct:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
