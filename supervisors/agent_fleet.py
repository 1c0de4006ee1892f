"""An agent fleet fed through a pool: priorities, a daily budget, retries, a circuit breaker; it
runs until you stop it.

What it shows: a ``feeder`` task submits a simulated agent turn about once a
second, at mixed priorities: "summarize", "plan" and "review" are async
handlers, "tool" runs as a process job (payload on stdin, spend over the notify
socket, a stall watchdog of 3 s for when it hangs). The ``turns`` pool runs at
most three at once; each turn "calls a model", reports what it cost (about its
estimate) and sometimes fails: a failed turn is retried once after a backoff
(``job.retried``), and a turn that keeps failing goes to the dead letters
(``job.dead_lettered``). Review turns fail half the time, so failures in a row
open the circuit breaker for 5 s (``circuit.opened``, then ``half_open`` and
``closed``): the pool holds its queue meanwhile.

The budget gate: the day here is a demo day of 10 minutes (the pool's ``now=``
clock runs 144 times faster than real time, in UTC, so a demo day starts at
every whole ten minutes). The feeder asks for about $2 of turns a demo day and
the budget is $1.50, so each demo day the pool warns at 90%
(``budget.warning``), refuses turns whose estimate no longer fits
(``job.rejected budget``; ``budget.exhausted`` too if the last turns cost more
than their estimates and spend reaches the limit), and opens again when the
demo day ends (``budget.reset``). While refused, the feeder backs off (2 s,
doubling up to 30 s, and never past the end of the demo day), so a closed gate
costs a handful of lines, not a flood. While the pool is down
(``otree stop turns``) the feeder waits for it to come back. Under ``otree run``
the pool is durable: restart it (or otree) and the queue, the demo day's spend
and the dead letters are still there (a run started again late in a demo day may
begin with the gate closed, until that day ends).

Run it:   otree run supervisors/agent_fleet.py --state-dir /tmp/otree-fleet
Then try: otree status --state-dir /tmp/otree-fleet       (queue, budget left, circuit)
          otree jobs turns --state-dir /tmp/otree-fleet
          otree dead-letters turns --state-dir /tmp/otree-fleet
          otree stop turns --state-dir /tmp/otree-fleet    (the feeder waits; the tree stays up)
          otree start turns --state-dir /tmp/otree-fleet   (queued and interrupted jobs run again)
          otree restart feeder --state-dir /tmp/otree-fleet
          otree submit turns plan '{"agent": "me", "cost": 0.02, "fail_rate": 0}' --cost 0.02 \\
              --state-dir /tmp/otree-fleet
          otree events --kind 'budget.*' --state-dir /tmp/otree-fleet
Faster:   OTREE_DEMO_SPEED=10 otree run ...  (everything the demo times ten times shorter: turns,
          the feeder's pace, the demo day, the retry backoff, the breaker's cooldown; the tool's
          stall watchdog stays 3 s)
"""

from __future__ import annotations

import datetime as dt
import os
import random
import sys
import time
from typing import Any

import trio

import otree

SPEED = float(os.environ.get("OTREE_DEMO_SPEED", "1"))  # > 1: the fleet lives SPEED times faster
DEMO_DAY = 600.0 / SPEED  # real seconds in one budget day of the demo
_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()


def demo_clock() -> dt.datetime:
    """The budget days' clock: from 2026-01-01 on, a day passes every ``DEMO_DAY`` real seconds."""
    return dt.datetime.fromtimestamp(_EPOCH + (time.time() - _EPOCH) * 86400.0 / DEMO_DAY, dt.UTC)


def until_demo_midnight() -> float:
    """Real seconds until the demo day ends (and the budget resets)."""
    return DEMO_DAY - (time.time() - _EPOCH) % DEMO_DAY


# A tool call as a process job: the payload arrives on stdin, spend goes over the
# notify socket, the result is what it prints; now and then it hangs without a word.
TOOL = """
import json, os, random, socket, sys, time
payload = json.load(sys.stdin)
roll = random.random()
if roll < payload.get("hang_rate", 0):
    time.sleep(100000)  # the sandbox hangs: the pool's stall watchdog stops it
time.sleep(random.uniform(0.1, 0.4) / float(os.environ.get("OTREE_DEMO_SPEED", "1")))
cost = payload["cost"] * random.uniform(0.5, 1.5)  # the estimate was a guess
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(
    f"OTREE_COST={cost:.6f}".encode(), os.environ["NOTIFY_SOCKET"])
if roll > 1 - payload["fail_rate"]:
    sys.exit("tool: sandbox timed out")
print(json.dumps({"agent": payload["agent"], "ok": True}))
"""

# kind, priority, estimated cost (USD), failure rate per try
KINDS = [
    ("summarize", 0, 0.002, 0.1),
    ("plan", 5, 0.004, 0.1),
    ("review", -5, 0.003, 0.5),
    ("tool", 0, 0.002, 0.15),
]


async def turn(payload: dict[str, Any]) -> str:
    """One agent turn: a model call that costs money (about its estimate) and sometimes fails."""
    me = otree.current_child()
    await trio.sleep(random.uniform(0.2, 0.8) / SPEED)
    me.report_cost(payload["cost"] * random.uniform(0.5, 1.5))  # the estimate was a guess
    if random.random() < payload["fail_rate"]:
        raise RuntimeError(f"{payload['agent']}: model returned 529 overloaded")
    return f"{payload['agent']} done"


async def feeder() -> None:
    """Submits a turn every second or so; backs off while refused, waits while the pool is down."""
    pool = otree.current_child().supervisor.child("turns")
    refused = 0
    for n in range(1, sys.maxsize):
        kind, priority, cost, fail_rate = random.choice(KINDS)
        payload = {"agent": f"{kind}-{n}", "cost": cost, "fail_rate": fail_rate}
        if kind == "tool":
            payload["hang_rate"] = 0.03  # a tool's sandbox may hang
        try:
            await pool.submit(kind, payload, priority=priority, estimated_cost=cost)
        except (otree.BudgetExceeded, otree.QueueFull) as refusal:  # its job.rejected event says why
            refused += 1
            pause = min(30.0, 2.0 * 2 ** (refused - 1)) / SPEED  # back off: 2 s, 4 s, ... 30 s
            if isinstance(refusal, otree.BudgetExceeded):  # but come back as soon as the day ends
                pause = min(pause, until_demo_midnight() + 0.01)
        except otree.NotRunning:  # the pool is stopped or restarting: look again in a second
            pause = 1.0 / SPEED
        else:
            refused = 0
            pause = random.uniform(0.5, 1.5) / SPEED
        await trio.sleep(pause)


# Intensity: nothing here is meant to fail at the root. Job failures stay inside the pool
# (retries, dead letters, the breaker), and the feeder handles every refusal (budget, full queue,
# pool down), so the root sees no restarts at all; its default intensity (3 in 5 s) stays, so a
# bug in the feeder would show as the root giving up instead of hiding in a crash loop.
tree = otree.supervisor(
    "fleet",
    children=[
        otree.pool(
            "turns",
            {
                "summarize": turn,
                "plan": turn,
                "review": turn,
                "tool": otree.process_job([sys.executable, "-I", "-S", "-c", TOOL], stall_timeout=3.0),
            },
            max_concurrency=3,
            max_queue=20,
            daily_budget=1.50,
            budget_tz="UTC",
            now=demo_clock,
            max_attempts=2,
            backoff=otree.Backoff(initial=0.5 / SPEED, maximum=5.0 / SPEED, jitter=0.0),
            circuit_breaker=otree.CircuitBreaker(failures=3, cooldown=5.0 / SPEED),
        ),
        otree.task("feeder", feeder),
    ],
)
