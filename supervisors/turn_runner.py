"""A turn runner: agents take turns through a CLI, one turn per agent at a time, agents in parallel.

What it shows (docs/recipes.md, "turn runner"): each turn is a process job of the
``turns`` pool in the agent's lane (``--lane AGENT``): an agent's next turn waits for
its current one, other agents' turns run beside it (eight at most). The turn arrives
on the CLI's stdin, then EOF; its reply is what it prints on stdout. Its progress
lines on stderr reset a stall watchdog of 600 s; a turn silent for longer is stopped.
A stop (``otree cancel``, a stall, the tree's stop) sends SIGTERM to the turn's
process group, then SIGKILL 2 s later. Whoever submitted with ``--wait`` is told how
the turn ended (exit 6 and its stderr tail when the worker died). ``otree jobs`` shows
each running turn's pid; each turn's output is kept in its own log files.

Run it:   otree run supervisors/turn_runner.py --state-dir /tmp/otree-turns
Then try: otree submit turns turn '{"agent": "ada", "steps": 20}' --lane ada --wait \\
              --state-dir /tmp/otree-turns
          otree submit turns turn '{"agent": "ada"}' --lane ada --state-dir /tmp/otree-turns
          otree jobs turns --state-dir /tmp/otree-turns            (pids, lanes, the queued turn)
          otree cancel turns JOB_ID --state-dir /tmp/otree-turns   (abort one turn)
          otree signal turns KILL --job JOB_ID --state-dir /tmp/otree-turns (the worker dies)
          otree logs turns/JOB_ID --state-dir /tmp/otree-turns      (that turn's own log)
          otree events --follow --kind 'job.*' --state-dir /tmp/otree-turns
Faster:   OTREE_DEMO_SPEED=100 otree run ...  (the stall watchdog a hundred times shorter)
"""

import os
import sys

import otree

SPEED = float(os.environ.get("OTREE_DEMO_SPEED", "1"))

# The agent CLI's stand-in: the turn on stdin, progress on stderr, the reply on stdout.
AGENT = """import json, signal, sys, time
turn = json.load(sys.stdin)
if turn.get("ignore_sigterm"):  # a CLI deaf to SIGTERM: SIGKILL comes 2 s later
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
for step in range(turn.get("steps", 3)):
    print(f"{turn['agent']}: step {step}", file=sys.stderr, flush=True)
    time.sleep(turn.get("pause", 0.5))
if turn.get("fail"):
    sys.exit(f"{turn['agent']}: the model call failed")
print(json.dumps({"agent": turn["agent"], "reply": "done"}))
"""

tree = otree.supervisor(
    "runner",
    children=[
        otree.pool(
            "turns",
            {
                "turn": otree.process_job(
                    [sys.executable, "-c", AGENT], stall_timeout=600 / SPEED, shutdown=2.0, logs=True
                )
            },
            max_concurrency=8,
            lane_concurrency=1,
            job_shutdown=2.0,  # a cancel or the pool's stop (shutdown=2.0 above: a stall's stop)
        ),
    ],
)
