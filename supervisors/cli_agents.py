"""A fleet of CLI agent processes, each in its own process group, with a stall watchdog; it runs
until you stop it.

What it shows: each agent (``supervisors/cli_agent.py``) spawns a helper
grandchild, reports readiness over the notify socket (``ready="notify"``),
reports its turn with ``STATUS=`` (``child.status`` events, and the last one in
``otree status``), prints progress, and sometimes crashes (exit 1) or hangs.
The watchdog stops a hung agent after 3 s of silence (an ``error`` exit,
detail ``stalled``); the supervisor restarts a failed agent after a backoff
(1 s, doubling while it keeps failing, at most 8 s), and every stop takes the
agent's helper with it. The root never gives up (the arithmetic is beside the
tree below). Logs land under the state dir (``<state dir>/logs/agents/<name>/``).
Ctrl-C sends each agent SIGTERM, which ends it and its helper at once.

Run it:   otree run supervisors/cli_agents.py --state-dir /tmp/otree-demo
Then try: otree status --state-dir /tmp/otree-demo           (pids, STATUS=, restarts)
          otree stop agents/ada --state-dir /tmp/otree-demo  (ada and its helper are gone)
          otree start agents/ada --state-dir /tmp/otree-demo
          otree restart agents/linus --state-dir /tmp/otree-demo
          otree events --kind child.exited --state-dir /tmp/otree-demo
          tail -f /tmp/otree-demo/logs/agents/ada/stdout.log
Faster:   OTREE_DEMO_SPEED=10 otree run ...  (turns ten times shorter, so ten times the
          crashes per second; the supervisor's settings and the watchdog stay as they are)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import otree

SPEED = float(os.environ.get("OTREE_DEMO_SPEED", "1"))  # > 1: the agents live SPEED times faster
AGENT = str(Path(__file__).with_name("cli_agent.py"))


def agent(name: str, crash_rate: float, hang_rate: float) -> otree.ProcessSpec:
    return otree.process(
        name,
        [sys.executable, AGENT, name, str(crash_rate), str(hang_rate), str(SPEED)],
        ready="notify",
        start_timeout=5.0,
        stall_timeout=3.0,
        shutdown=2.0,
    )


# Intensity, worked out so that the root never gives up, whatever the agents' failure rates or
# SPEED: the Backoff makes every automatic restart of an agent (a retried start included) wait at
# least initial * (1 - jitter) = 0.9 s, and an agent can only fail again once it runs again, so one
# agent's restarts are at least 0.9 s apart: in any 5 s window at most floor(5 / 0.9) + 1 = 6 per
# agent, 18 for the three. The root allows 20; the 2 to spare absorb an operator's `otree start` or
# `otree restart` of an agent while it waits out its backoff (manual starts skip the wait).
# A hopeless agent (one that can never start) is not given up on: it is retried every 8 s.
tree = otree.supervisor(
    "agents",
    strategy="one_for_one",
    max_restarts=20,
    max_seconds=5.0,
    backoff=otree.Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.1, reset_after=10.0),
    children=[agent("ada", 0.04, 0.02), agent("grace", 0.02, 0.03), agent("linus", 0.05, 0.02)],
)
