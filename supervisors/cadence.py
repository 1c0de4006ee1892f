"""A cadence consumer: each cadence ticks on its own period and each tick runs one sub-session.

What it shows (docs/recipes.md, "cadence consumer"): ``clock`` queues a tick of each
cadence when it is due, in the cadence's lane of the durable ``sessions`` pool (one
waiting or running tick per cadence: the cadence is its key). One sub-session runs at a
time, and at most one starts per scheduler tick (10 s). A tick gets two attempts, the
retry after the schedule 0 s, 30 s, 120 s, and a failed tick holds back its own cadence
only (FIFO lanes). Three failures of a cadence open its own breaker for 30 min; its
ticks wait meanwhile and keep their attempts (``otree lane sessions CADENCE`` shows the
circuit). A sub-session may run 30 min; its stderr tail (4 KiB) is kept with a failure
and each run's stdout and stderr are kept in files. If otree dies under a running
sub-session, the tick it had claimed runs again when otree is back.

Run it:   otree run supervisors/cadence.py --state-dir /tmp/otree-cadence
Then try: otree jobs sessions --state-dir /tmp/otree-cadence
          otree lane sessions inbox --state-dir /tmp/otree-cadence
          otree logs sessions/JOB_ID --state-dir /tmp/otree-cadence
          OTREE_CADENCE_FAIL=inbox otree run ...   (inbox's sub-sessions fail: retry, then its breaker)
Faster:   OTREE_DEMO_SPEED=100 otree run ...  (periods, tick, backoff, breaker and limits 100 times shorter)
          OTREE_CADENCE_WORK=SECONDS: how long a sub-session works (default 2, not scaled)
"""

import contextlib
import os
import sys

import trio

import otree

SPEED = float(os.environ.get("OTREE_DEMO_SPEED", "1"))
CADENCES = {"inbox": 300, "digest": 3600}  # seconds between two ticks of each
TICK = 10  # seconds between two looks of the scheduler

# A sub-session's stand-in: works a while, talking on stderr; fails if its cadence is told to.
SESSION = """import json, os, sys, time
tick = json.load(sys.stdin)
for line in range(400):  # more than the 4 KiB tail keeps
    print(f"{tick['cadence']}: step {line}", file=sys.stderr)
time.sleep(float(os.environ.get("OTREE_CADENCE_WORK", "2")))
if tick["cadence"] in os.environ.get("OTREE_CADENCE_FAIL", "").split(","):
    sys.exit(f"{tick['cadence']}: the session failed")
print(json.dumps({"cadence": tick["cadence"], "done": True}))
"""


async def clock() -> None:
    """Each tick, queue a tick of every cadence that is due (its key keeps it to one at a time)."""
    sessions = otree.current_child().supervisor.child("sessions")
    due = dict.fromkeys(CADENCES, trio.current_time())
    while True:
        for cadence, period in CADENCES.items():
            if trio.current_time() >= due[cadence]:
                with contextlib.suppress(otree.NotRunning):  # the pool is stopped: next tick
                    await sessions.submit("session", {"cadence": cadence}, lane=cadence, key=cadence)
                    due[cadence] = trio.current_time() + period / SPEED
        await trio.sleep(TICK / SPEED)


tree = otree.supervisor(
    "cadence",
    children=[
        otree.pool(
            "sessions",
            {"session": otree.process_job([sys.executable, "-c", SESSION], logs=True)},
            durable=True,
            max_concurrency=1,
            max_starts_per_second=SPEED / TICK,
            max_attempts=2,
            backoff=otree.Backoff.schedule([0, 30 / SPEED, 120 / SPEED]),
            lane_order="fifo",
            lane_circuit_breaker=otree.CircuitBreaker(failures=3, cooldown=1800 / SPEED),
            max_runtime=1800 / SPEED,
        ),
        otree.task("clock", clock),
    ],
)
