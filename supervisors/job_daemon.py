"""A daemon job supervisor: jobs are commands, run four at a time under a budget and a breaker.

What it shows (docs/recipes.md, "daemon job supervisor"): the ``jobs`` pool runs each
submitted command (its argv from the payload, never through a shell) as a process job
in its own process group, four at once; at most 20 wait, and the 21st is refused; the
higher ``--priority`` runs first. A job may report what it cost (``"cost"`` in the
payload stands for the model bill); the daily budget warns at 90 % and refuses a job
once spent plus its estimate would reach the limit. Five failures in a row open the
breaker for 120 s, and new jobs are refused while it is open. ``loops/poller`` is a
long-running loop: three deaths within five minutes and ``loops`` gives up for good
(``stopped`` until an operator's ``otree start loops``), while jobs keep running. A stop
gives running jobs 30 s; queued jobs are reported as dropped (``pool_stopped``). Orphans
that jobs leave behind are reaped (otree is their subreaper).

Run it:   otree run supervisors/job_daemon.py --state-dir /tmp/otree-jobs
Then try: otree submit jobs run '{"argv": ["sleep", "20"], "cost": 0.5}' --cost 0.5 \\
              --state-dir /tmp/otree-jobs
          otree submit jobs run '{"argv": ["false"]}' --priority 5 --state-dir /tmp/otree-jobs
          otree status --state-dir /tmp/otree-jobs          (queue, budget left, circuit)
          otree jobs jobs --state-dir /tmp/otree-jobs
          otree cancel jobs JOB_ID --state-dir /tmp/otree-jobs  (the job's whole group is killed)
          otree signal loops/poller KILL --state-dir /tmp/otree-jobs   (three times: loops gives up)
          otree events --kind 'budget.*' --state-dir /tmp/otree-jobs
Faster:   OTREE_DEMO_SPEED=100 otree run ...  (the breaker's cooldown, the loop's window and the
          stop grace a hundred times shorter); OTREE_DAILY_BUDGET=USD sets the budget (default 20)
"""

import os
import sys

import otree

SPEED = float(os.environ.get("OTREE_DEMO_SPEED", "1"))

# A job: report the cost the payload names over the notify socket, then become its argv.
RUN = """import json, os, socket, sys
job = json.load(sys.stdin)
if job.get("cost"):
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(
        f"OTREE_COST={job['cost']}".encode(), os.environ["NOTIFY_SOCKET"])
os.execvp(job["argv"][0], job["argv"])
"""

tree = otree.supervisor(
    "daemon",
    children=[
        otree.pool(
            "jobs",
            {"run": otree.process_job([sys.executable, "-I", "-c", RUN])},
            max_concurrency=4,
            max_queue=20,
            daily_budget=float(os.environ.get("OTREE_DAILY_BUDGET", "20")),
            budget_warn_at=0.9,
            budget_rule="lt",
            circuit_breaker=otree.CircuitBreaker(failures=5, cooldown=120 / SPEED),
            on_circuit_open="reject",
            job_shutdown=30 / SPEED,
            durable=False,  # as the daemon it stands for: a stop reports queued jobs and forgets them
        ),
        otree.supervisor(
            "loops",
            restart="on_demand",  # given up: stays stopped (shown) until `otree start loops`
            max_restarts=2,
            max_seconds=300 / SPEED,
            children=[
                otree.process("poller", [sys.executable, "-c", "import time\nwhile True: time.sleep(60)"])
            ],
        ),
    ],
)
