"""A simulated CLI agent: the kind of process ``supervisors/cli_agents.py`` supervises (not a tree).

It starts a helper grandchild (a "tool server"), reports readiness and status
over ``$NOTIFY_SOCKET`` (the systemd protocol), prints progress for each turn,
and now and then crashes (exit 1) or hangs without a word, which the stall
watchdog catches. SIGTERM (otree's stop signal) ends it at once, helper
included, since the helper shares its process group. Standard library only.

Usage: cli_agent.py NAME CRASH_RATE HANG_RATE [SPEED]
(rates are per turn; SPEED > 1 makes its turns SPEED times shorter).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), path)


def main() -> None:
    name = sys.argv[1]
    crash_rate, hang_rate = float(sys.argv[2]), float(sys.argv[3])
    speed = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    # The helper would outlive a careless supervisor; otree kills it with the agent's group.
    subprocess.Popen(["sleep", "100000"])
    time.sleep(random.uniform(0.1, 0.3) / speed)
    notify("READY=1\nSTATUS=idle")
    for turn in range(1, 1_000_000):
        notify(f"STATUS=turn {turn}")
        roll = random.random()
        if roll < hang_rate:
            time.sleep(100000)  # hung on the model: no output, no WATCHDOG=1
        time.sleep(random.uniform(0.3, 1.2) / speed)
        if roll > 1 - crash_rate:
            print(f"{name}: turn {turn}: tool call failed", file=sys.stderr, flush=True)
            sys.exit(1)
        print(f"{name}: turn {turn} done", flush=True)
        notify("OTREE_COST=0.003")


if __name__ == "__main__":
    main()
