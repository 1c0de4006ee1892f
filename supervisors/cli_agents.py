"""A fleet of CLI agent processes, each in its own process group, with a stall watchdog.

Each agent (``supervisors/cli_agent.py``) spawns a helper grandchild, reports
readiness over the notify socket, prints progress, and sometimes crashes or
hangs. The watchdog stops a hung agent after 3 s of silence (an ``error`` exit,
detail ``stalled``) and the supervisor restarts it; every stop takes the
agent's helper with it. Logs land under the state dir
(``<state dir>/logs/agents/<name>/``).

Run it:  otree run supervisors/cli_agents.py --state-dir /tmp/otree-demo
"""

from __future__ import annotations

import sys
from pathlib import Path

import otree

AGENT = str(Path(__file__).with_name("cli_agent.py"))


def agent(name: str, crash_rate: float, hang_rate: float) -> otree.ProcessSpec:
    return otree.process(
        name,
        [sys.executable, AGENT, name, str(crash_rate), str(hang_rate)],
        ready="notify",
        start_timeout=5.0,
        stall_timeout=3.0,
        shutdown=2.0,
    )


tree = otree.supervisor(
    "agents",
    strategy="one_for_one",
    max_restarts=10,
    max_seconds=60.0,
    children=[agent("ada", 0.04, 0.02), agent("grace", 0.02, 0.03), agent("linus", 0.05, 0.02)],
)
