"""An outbox: messages wait in a durable queue and go out through a provider gateway, in order per
destination.

What it shows (docs/recipes.md, "outbox"): ``gateway/provider`` stands for the messaging
provider's connection, a process listening on a Unix socket that logs each message it
sends. When it dies it is restarted after min(10 s, max(0.5 s, 0.5 s * recent exits));
after six deaths in a minute ``gateway`` gives up and leaves it offline until an
operator starts it again. Each exit is told to ``notice`` (an on_exit hook); a hook that
fails is reported as a ``child.on_exit_failed`` event. The ``messages`` pool is durable
(SQLite in the state dir): a message is tried 12 times, 1 s … 60 s apart with half
jitter, then kept as a dead letter (poison). Messages to one destination (``--lane``) go
strictly in order: a failed one holds its destination until its retry, others go on.
At most 5000 wait; beyond that the oldest is dropped. A message submitted with the
``--key`` of a waiting one replaces it in place (coalesced).

Run it:   otree run supervisors/outbox.py --state-dir /tmp/otree-outbox
Then try: otree submit messages send '{"to": "ada", "text": "hi"}' --lane ada --key ada-hi \\
              --state-dir /tmp/otree-outbox
          otree logs gateway/provider --state-dir /tmp/otree-outbox     (what went out)
          otree signal gateway/provider KILL --state-dir /tmp/otree-outbox (restarted after 0.5 s, 1 s, ...)
          otree stop gateway --state-dir /tmp/otree-outbox   (messages wait and retry; `start` resumes)
          otree dead-letters messages --state-dir /tmp/otree-outbox
          otree log-level --state-dir /tmp/otree-outbox   (read it; `otree log-level warning` sets it)
Faster:   OTREE_DEMO_SPEED=100 otree run ...  (every delay, window and backoff a hundred times shorter)
          OTREE_OUTBOX_SOCKET sets the gateway's socket path; OTREE_OUTBOX_NOTICES the hook's file.
"""

import json
import os
import sys
import tempfile
import time
from typing import Any

import trio

import otree

SPEED = float(os.environ.get("OTREE_DEMO_SPEED", "1"))
SOCKET = os.environ.get("OTREE_OUTBOX_SOCKET", f"{tempfile.gettempdir()}/otree-outbox-{os.getuid()}.sock")
NOTICES = os.environ.get(
    "OTREE_OUTBOX_NOTICES", f"{tempfile.gettempdir()}/otree-outbox-{os.getuid()}.notices"
)

# The provider's stand-in: takes one JSON message per connection, "sends" it (a log line) and
# acknowledges it, or refuses a message without text.
PROVIDER = """import json, os, socket, sys
path = sys.argv[1]
if os.path.exists(path):
    os.unlink(path)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
while True:
    conn, _ = server.accept()
    with conn:
        message = json.loads(conn.makefile().readline())
        if not message.get("text"):
            conn.sendall(b"refused: no text\\n")
            continue
        print("sent", json.dumps(message), flush=True)
        conn.sendall(b"ok\\n")
"""


async def send(message: dict[str, Any]) -> str:
    """Hand one message to the provider; fails (and is retried) while the provider is offline."""
    async with await trio.open_unix_socket(SOCKET) as conn:
        await conn.send_all(json.dumps(message).encode() + b"\n")
        if (reply := await conn.receive_some(64)) != b"ok\n":
            raise RuntimeError(f"the provider did not take it: {reply.decode(errors='replace').strip()}")
    return f"sent to {message['to']}"


async def notice(path: str, exit_info: otree.ExitInfo) -> None:
    """Tell the operators the provider went down (a line in the notices file)."""
    with open(NOTICES, "a") as notices:
        notices.write(f"{time.strftime('%H:%M:%S')} {path} {exit_info.reason} {exit_info.detail}\n")


tree = otree.supervisor(
    "outbox",
    children=[
        otree.supervisor(
            "gateway",
            restart="on_demand",  # given up: offline (stopped) until `otree start gateway`
            max_restarts=5,
            max_seconds=60 / SPEED,
            backoff=otree.Backoff(
                initial=0.5 / SPEED,
                factor=1,
                step=0.5 / SPEED,
                maximum=10 / SPEED,
                jitter=0,
                reset_after=60 / SPEED,
            ),
            children=[otree.process("provider", [sys.executable, "-c", PROVIDER, SOCKET], on_exit=notice)],
        ),
        otree.pool(
            "messages",
            {"send": send},
            durable=True,
            max_concurrency=16,
            max_attempts=12,
            backoff=otree.Backoff(initial=1 / SPEED, maximum=60 / SPEED, jitter=0.5, jitter_mode="down"),
            lane_order="fifo",
            lane_concurrency=1,
            max_queue=5000,
            on_full="drop_oldest",
            on_duplicate_key="replace",
        ),
    ],
)
