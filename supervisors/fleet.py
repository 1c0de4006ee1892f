"""A small fleet of simulated agent loops, supervised.

Each agent takes turns that "call an LLM": a turn sometimes fails (the API
returned an error) and sometimes hangs until the agent's own step timeout
gives up on it. Both crash the agent, and its supervisor restarts it; too many
crashes in a short time make the ``agents`` supervisor give up, and the root
restarts the whole group. Ctrl-C stops everything in reverse start order.

Run it:  otree run supervisors/fleet.py
"""

from __future__ import annotations

import random

import trio

import otree

STEP_TIMEOUT = 2.0  # seconds a turn may take before the agent calls it hung


async def agent(name: str, crash_rate: float, hang_rate: float, *, task_status=trio.TASK_STATUS_IGNORED):
    """One agent loop: connect, then take turns until stopped."""
    me = otree.current_child()
    await trio.sleep(random.uniform(0.05, 0.2))  # "connect"
    task_status.started()
    turn = 0
    while not me.stopping.is_set():
        turn += 1
        roll = random.random()
        with trio.move_on_after(STEP_TIMEOUT) as step:
            if roll < hang_rate:
                await trio.sleep_forever()  # the model never answers
            await trio.sleep(random.uniform(0.3, 1.5))
        if step.cancelled_caught:
            raise TimeoutError(f"{name}: turn {turn} hung for {STEP_TIMEOUT:g}s")
        if roll > 1 - crash_rate:
            raise RuntimeError(f"{name}: turn {turn}: LLM API returned 529 overloaded")
        me.report_cost(0.002)


async def planner(*, task_status=trio.TASK_STATUS_IGNORED):
    """A long-lived helper the agents would talk to; it only has to stay up."""
    task_status.started()
    await trio.sleep_forever()


tree = otree.supervisor(
    "fleet",
    strategy="rest_for_one",
    max_restarts=5,
    max_seconds=60.0,
    children=[
        otree.task("planner", planner),
        otree.supervisor(
            "agents",
            strategy="one_for_one",
            max_restarts=4,
            max_seconds=10.0,
            children=[
                otree.task("alice", agent, "alice", 0.10, 0.05, shutdown=3.0),
                otree.task("bob", agent, "bob", 0.15, 0.05, shutdown=3.0),
                otree.task("carol", agent, "carol", 0.05, 0.10, shutdown=3.0),
            ],
        ),
    ],
)
