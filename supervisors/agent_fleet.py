"""An agent fleet fed through a pool: priorities, a small daily budget, retries, a circuit breaker.

A ``feeder`` task submits simulated agent turns at mixed priorities: "summarize",
"plan" and "review" are async handlers, "tool" runs as a process job (payload on
stdin, spend over the notify socket). The ``turns`` pool runs at most three at
once; each turn "calls a model", reports its cost, and sometimes fails: a failed
turn is retried once after a backoff, and a turn that keeps failing goes to the
dead letters. Review turns go through a flaky tool, so failures in a row open
the circuit breaker for a while. The $0.60 daily budget runs out partway: the
gate closes (``budget.exhausted``) and later submissions are rejected until
midnight. Under ``otree run`` the pool is durable: restart it and the queue,
today's spend and the dead letters are still there.

Run it:  otree run supervisors/agent_fleet.py --state-dir /tmp/otree-fleet
"""

from __future__ import annotations

import contextlib
import random
import sys

import trio

import otree

# A tool call as a process job: the payload arrives on stdin, spend goes over the
# notify socket, the result is what it prints.
TOOL = """
import json, os, random, socket, sys, time
payload = json.load(sys.stdin)
time.sleep(random.uniform(0.1, 0.4))
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(
    f"OTREE_COST={payload['cost']}".encode(), os.environ["NOTIFY_SOCKET"])
if random.random() < payload["fail_rate"]:
    sys.exit("tool: sandbox timed out")
print(json.dumps({"agent": payload["agent"], "ok": True}))
"""


async def turn(payload: dict[str, object]) -> str:
    """One agent turn: a model call that costs money and sometimes fails."""
    me = otree.current_child()
    await trio.sleep(random.uniform(0.2, 0.8))
    me.report_cost(float(payload["cost"]))  # type: ignore[arg-type]
    if random.random() < float(payload["fail_rate"]):  # type: ignore[arg-type]
        raise RuntimeError(f"{payload['agent']}: model returned 529 overloaded")
    return f"{payload['agent']} done"


async def feeder() -> None:
    """Submits a stream of turns; a rejected submission (budget or full queue) is skipped."""
    pool = otree.current_child().supervisor.child("turns")
    kinds = [
        ("summarize", 0, 0.01, 0.2),
        ("plan", 5, 0.03, 0.2),
        ("review", -5, 0.02, 0.7),
        ("tool", 0, 0.01, 0.3),
    ]
    for n in range(1, 10_000):
        kind, priority, cost, fail_rate = random.choice(kinds)
        payload = {"agent": f"{kind}-{n}", "cost": cost, "fail_rate": fail_rate}
        with contextlib.suppress(otree.BudgetExceeded, otree.QueueFull):  # job.rejected says why
            await pool.submit(kind, payload, priority=priority, estimated_cost=cost, key=f"turn-{n}")
        await trio.sleep(0.3)


tree = otree.supervisor(
    "fleet",
    children=[
        otree.pool(
            "turns",
            {
                "summarize": turn,
                "plan": turn,
                "review": turn,
                "tool": otree.process_job([sys.executable, "-c", TOOL]),
            },
            max_concurrency=3,
            max_queue=20,
            daily_budget=0.60,
            max_attempts=2,
            backoff=otree.Backoff(initial=0.5, maximum=5.0, jitter=0.0),
            circuit_breaker=otree.CircuitBreaker(failures=3, cooldown=5.0),
        ),
        otree.task("feeder", feeder),
    ],
)
