"""A small fleet of simulated agent loops, supervised; it runs until you stop it.

What it shows: each agent takes turns that "call an LLM". A turn sometimes
fails (the API returned an error) and sometimes hangs until the agent's own
step timeout gives up on it; both crash the agent, and the ``agents``
supervisor restarts it at once (``child.exited error``, ``child.restarting``).
Now and then crashes bunch up: more than 4 restarts within 10 s make
``agents`` give up (``fleet/agents supervisor.intensity_exceeded``), and the
root restarts the whole group after a backoff of 5 s (10 s, then 20 s if it
gives up again soon). The root itself never gives up (the arithmetic is beside
the tree below). Ctrl-C stops everything in reverse start order; an agent
drops the turn in flight when asked to stop, so the stop is quick and clean.

Run it:   otree run supervisors/fleet.py
Then try: otree status                       (states, restarts, the restart windows)
          otree stop fleet/agents/bob        (a manual stop: bob stays stopped)
          otree start fleet/agents/bob
          otree restart fleet/agents         (the whole group, not counted as a restart)
          otree stop fleet/planner           (the agents keep running)
          otree events --kind 'supervisor.*'
Faster:   OTREE_DEMO_SPEED=10 otree run supervisors/fleet.py  (turns ten times shorter, so
          ten times the crashes per second; the supervisors' settings stay as they are)
"""

from __future__ import annotations

import math
import os
import random

import trio

import otree

SPEED = float(os.environ.get("OTREE_DEMO_SPEED", "1"))  # > 1: the agents live SPEED times faster
STEP_TIMEOUT = 2.0 / SPEED  # seconds a turn may take before the agent calls it hung


async def agent(
    name: str,
    crash_rate: float,
    hang_rate: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One agent loop: connect, then take turns until stopped."""
    me = otree.current_child()
    await trio.sleep(random.uniform(0.05, 0.2) / SPEED)  # "connect"
    task_status.started()
    turn = 0
    while True:
        turn += 1
        roll = random.random()
        # the model's answer takes this long; inf: it never answers
        latency = math.inf if roll < hang_rate else random.uniform(0.3, 1.5) / SPEED
        with trio.move_on_after(STEP_TIMEOUT) as step, trio.move_on_after(latency):
            await me.stopping.wait()  # "call the model", unless asked to stop first
        if me.stopping.is_set():
            return  # asked to stop: the turn in flight is dropped (a clean `shutdown` exit)
        if step.cancelled_caught:
            raise TimeoutError(f"{name}: turn {turn} hung for {STEP_TIMEOUT:g}s")
        if roll > 1 - crash_rate:
            raise RuntimeError(f"{name}: turn {turn}: LLM API returned 529 overloaded")
        me.report_cost(0.002)


async def planner(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A long-lived helper the agents would talk to; it only has to stay up until asked to stop."""
    task_status.started()
    await otree.current_child().stopping.wait()


# Intensity, worked out so that only `agents` ever gives up, never the root:
# * `agents` restarts an agent at once, and gives up on the 5th restart within 10 s. With about
#   0.08 failures a second per agent (a failed or hung turn in ~13), three agents fail ~2.4 times
#   in 10 s on average, so it gives up now and then (at OTREE_DEMO_SPEED=10: every few seconds).
# * The root's Backoff makes every automatic restart of a root child wait at least
#   initial * (1 - jitter) = 4.5 s, and a child can only fail again once it runs again: restarts
#   of `agents` are at least 4.5 s apart, whatever the agents' failure rate or SPEED. In any 10 s
#   window that is at most floor(10 / 4.5) + 1 = 3 restarts; `planner` never fails. The root
#   allows 5, so it never gives up; the 2 to spare absorb an operator's `otree start` or
#   `otree restart` of `agents` while it waits out its backoff (manual starts skip the wait).
tree = otree.supervisor(
    "fleet",
    strategy="rest_for_one",
    max_restarts=5,
    max_seconds=10.0,
    backoff=otree.Backoff(initial=5.0, maximum=20.0, factor=2.0, jitter=0.1, reset_after=30.0),
    children=[
        otree.task("planner", planner),
        otree.supervisor(
            "agents",
            strategy="one_for_one",
            max_restarts=4,
            max_seconds=10.0,
            children=[
                otree.task("alice", agent, "alice", 0.05, 0.02, shutdown=3.0),
                otree.task("bob", agent, "bob", 0.06, 0.02, shutdown=3.0),
                otree.task("carol", agent, "carol", 0.03, 0.04, shutdown=3.0),
            ],
        ),
    ],
)
