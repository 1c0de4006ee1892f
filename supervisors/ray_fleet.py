"""A fleet spread over the nodes of a Ray cluster: crews of agent processes, each crew a sub-tree
in a Ray actor, and a pool whose turns run as Ray tasks; it runs until you stop it.

What it shows: otree stays the supervisor and Ray places the leaves. Each crew
(``crew-1``, ``crew-2``) is an ``otree.ray`` child: a supervisor of CLI agent
processes (``supervisors/cli_agent.py``: a helper grandchild each, notify
readiness, ``STATUS=``, spend, crashes and hangs) that runs under otree inside a
Ray actor, placed with ``SPREAD`` so the crews land on different nodes. The
crews restart their agents themselves, on their node (``ray_fleet/crew-1/ada
child.restarting``), and the events reach this tree's bus under full paths. The
``turns`` pool keeps its queue, cap, budget, retries and breaker here and runs
each turn as a Ray task spread over the nodes (``app.turn`` events name the node);
the ``feeder`` submits a turn every second or so. A crew whose actor dies (its
node lost, ``kill -9`` of its worker) is restarted here after a backoff and Ray
places the replacement on a live node (``ray.placed`` names it). Nothing ever
gives up at the root (the arithmetic is beside the tree). Ctrl-C stops the
feeder, the pool, then the crews (each agent gets SIGTERM on its node).

Run it (a cluster of three nodes on this machine, started and stopped with the tree):
          otree run supervisors/ray_fleet.py --ray local:3 --state-dir /tmp/otree-ray
On a real cluster (``ray start --head`` here, ``ray start --address HEAD:6379`` on the nodes):
          otree run supervisors/ray_fleet.py --ray auto --state-dir /tmp/otree-ray
Then try: otree status --state-dir /tmp/otree-ray                 (crews, their nodes and agents)
          otree stop ray_fleet/crew-1/ada --state-dir /tmp/otree-ray   (stopped on its node)
          otree start ray_fleet/crew-1/ada --state-dir /tmp/otree-ray
          otree restart ray_fleet/crew-2 --state-dir /tmp/otree-ray    (a new actor, placed by Ray)
          otree stop ray_fleet/turns --state-dir /tmp/otree-ray        (the feeder waits)
          otree submit ray_fleet/turns plan '{"agent": "me", "fail_rate": 0}' --cost 0.01 \\
              --state-dir /tmp/otree-ray
          otree events --kind 'app.*' --state-dir /tmp/otree-ray
Faster:   OTREE_DEMO_SPEED=10 otree run ...  (agents' turns and the pool's turns ten times shorter)
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import trio
from cli_agents import agent  # the agents of cli_agents.py (this file's directory is on sys.path)

import otree

SPEED = float(os.environ.get("OTREE_DEMO_SPEED", "1"))  # > 1: the fleet lives SPEED times faster


def crew(name: str, *agents: otree.ProcessSpec) -> otree.RaySpec:
    """A sub-tree of agents in one Ray actor, spread away from the other crews. It never gives up:
    each agent's restarts are at least 0.9 s apart (the Backoff), so at most floor(5 / 0.9) + 1 = 6
    per agent in 5 s, 12 for two; 20 allowed leaves room for an operator's starts."""
    return otree.ray(
        otree.supervisor(
            name,
            max_restarts=20,
            max_seconds=5.0,
            backoff=otree.Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.1, reset_after=10.0),
            children=list(agents),
        ),
        num_cpus=0,
        scheduling_strategy="SPREAD",
        start_timeout=120.0,  # a node just added may take a while to take its first actor
    )


async def turn(payload: dict[str, Any]) -> str:
    """One agent turn, run as a Ray task on some node: a model call that costs money and sometimes fails."""
    import ray  # on the node, inside the task

    me = otree.current_child()
    node = ray.get_runtime_context().get_node_id()[:8]
    await trio.sleep(random.uniform(0.2, 0.8) / SPEED)
    me.report_cost(0.01 * random.uniform(0.5, 1.5))
    if random.random() < payload.get("fail_rate", 0.1):
        raise RuntimeError(f"{payload['agent']}: model returned 529 overloaded (node {node})")
    me.emit("app.turn", "done", agent=payload["agent"], node=node)
    return f"{payload['agent']} done on node {node}"


async def feeder() -> None:
    """Submits a turn every second or so; backs off while refused, waits while the pool is down."""
    pool = otree.current_child().supervisor.child("turns")
    for n in range(1, sys.maxsize):
        kind = random.choice(["summarize", "plan"])
        try:
            await pool.submit(kind, {"agent": f"{kind}-{n}"}, estimated_cost=0.01)
        except (otree.BudgetExceeded, otree.QueueFull):  # its job.rejected event says why
            pause = 10.0 / SPEED
        except otree.NotRunning:  # the pool is stopped or restarting: look again in a second
            pause = 1.0 / SPEED
        else:
            pause = random.uniform(0.5, 1.5) / SPEED
        await trio.sleep(pause)


# Intensity, worked out so that the root never gives up: the root's Backoff makes every automatic
# restart of a root child wait at least initial * (1 - jitter) = 1.8 s, and a child fails again
# only once it runs again, so each child's restarts are at least 1.8 s apart: in 10 s at most
# floor(10 / 1.8) + 1 = 6 each, 24 for the four; 30 allowed leaves room for an operator's restarts.
# The crews and the pool keep their failures inside (restarts on the node, retries, dead letters).
tree = otree.supervisor(
    "ray_fleet",
    max_restarts=30,
    max_seconds=10.0,
    backoff=otree.Backoff(initial=2.0, maximum=30.0, factor=2.0, jitter=0.1, reset_after=60.0),
    children=[
        crew("crew-1", agent("ada", 0.04, 0.02), agent("grace", 0.02, 0.03)),
        crew("crew-2", agent("linus", 0.05, 0.02), agent("barbara", 0.03, 0.02)),
        otree.pool(
            "turns",
            {"summarize": turn, "plan": turn},
            max_concurrency=4,
            max_queue=50,
            daily_budget=20.0,
            max_attempts=2,
            backoff=otree.Backoff(initial=0.5 / SPEED, maximum=5.0 / SPEED, jitter=0.0),
            circuit_breaker=otree.CircuitBreaker(failures=5, cooldown=5.0 / SPEED),
            executor=otree.RayExecutor(num_cpus=0, scheduling_strategy="SPREAD"),
        ),
        otree.task("feeder", feeder),
    ],
)
