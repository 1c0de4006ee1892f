"""Peer lifecycle: each peer's session sleeps when idle and wakes on the next message.

What it shows (docs/recipes.md, "peer lifecycle"): each peer (``peers/ada``,
``peers/grace``) is a session process, started by the first message to it, behind its
own crash-loop guard: three deaths
within 300 s and the peer gives up, and the count survives a restart of otree (even
``kill -9``). A session must be ready within 240 s of its start (it says so over the
notify socket). An hour without output parks it; four hours after its start it is
replaced by a fresh one. A parked session resumes when woken (``OTREE_PREVIOUS_EXIT``
says ``shutdown:idle``); after a crash it starts fresh. Messages go through the
``inbox`` pool in the peer's lane (``--lane PEER``): delivering one wakes the peer
first if it sleeps, one wake at a time per peer. A peer an operator stopped stays
stopped: a message to it fails, and the refused wake is an event. Every decision
(parked, woken, refused, given up, aged out) is an event naming its cause.

Run it:   otree run supervisors/peers.py --state-dir /tmp/otree-peers
Then try: otree submit inbox message '{"to": "ada", "text": "hi"}' --lane ada --state-dir /tmp/otree-peers
          otree logs peers/ada/session --state-dir /tmp/otree-peers   (resume or fresh, and the messages)
          otree stop peers/ada/session --state-dir /tmp/otree-peers   (then a message to ada fails)
          otree start peers/ada/session --state-dir /tmp/otree-peers
          otree submit inbox message '{"to": "ada", "crash": true}' --lane ada --state-dir /tmp/otree-peers
          otree events --kind 'child.*' --state-dir /tmp/otree-peers
Faster:   OTREE_DEMO_SPEED=100 otree run ...  (every time above a hundred times shorter)
          OTREE_PEERS_MAX_AGE=SECONDS overrides the four hours; OTREE_PEERS_BOOT=SECONDS makes a
          session that long to get ready; OTREE_PEERS_DIR is where the sessions' sockets are.
"""

import json
import os
import sys
import tempfile
from typing import Any

import trio

import otree

SPEED = float(os.environ.get("OTREE_DEMO_SPEED", "1"))
MAX_AGE = float(os.environ.get("OTREE_PEERS_MAX_AGE", "14400"))
SOCKETS = os.environ.get("OTREE_PEERS_DIR", f"{tempfile.gettempdir()}/otree-peers-{os.getuid()}")

# A peer's session: resume or fresh by how the last run ended; ready once it listens; then each
# message is printed (output: not idle) and acknowledged, or it crashes when the message says so.
SESSION = """import json, os, socket, sys, time
path = sys.argv[1]
previous = os.environ.get("OTREE_PREVIOUS_EXIT", "")
print("resume" if previous.startswith("shutdown:idle") else "fresh", previous or "first run", flush=True)
time.sleep(float(os.environ.get("OTREE_PEERS_BOOT", "0")))
os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
if os.path.exists(path):
    os.unlink(path)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
while True:
    conn, _ = server.accept()
    with conn:
        message = json.loads(conn.makefile().readline())
        print("got", json.dumps(message), flush=True)
        if message.get("crash"):
            sys.exit("session: crashed on a message")
        conn.sendall(b"ok\\n")
"""


async def deliver(message: dict[str, Any]) -> str:
    """Wake the peer and its session if they sleep (no-op if they run), then hand them the message."""
    peers = otree.current_child().supervisor.parent.child("peers")
    await peers.wake(message["to"])
    session = await peers.child(message["to"]).wake("session")
    if session.state != "running":  # stopped by hand: the wake was refused, and stays so
        raise RuntimeError(f"{message['to']} is stopped by an operator")
    async with await trio.open_unix_socket(f"{SOCKETS}/{message['to']}.sock") as conn:
        await conn.send_all(json.dumps(message).encode() + b"\n")
        if await conn.receive_some(16) != b"ok\n":
            raise RuntimeError(f"{message['to']} did not take the message")
    return f"delivered to {message['to']}"


def peer(name: str) -> otree.SupervisorSpec:
    """One peer: its session, behind its own crash-loop guard (on_demand: given up, it waits for a wake)."""
    session = [sys.executable, "-c", SESSION, f"{SOCKETS}/{name}.sock"]
    return otree.supervisor(
        name,
        restart="on_demand",
        max_restarts=2,
        max_seconds=300 / SPEED,
        persist_intensity=True,
        children=[
            otree.process(
                "session",
                session,
                ready="notify",
                start_timeout=240 / SPEED,
                idle_timeout=3600 / SPEED,
                max_runtime=MAX_AGE / SPEED,
                autostart=False,  # lazy: the first message wakes it
            )
        ],
    )


tree = otree.supervisor(
    "lifecycle",
    children=[
        otree.supervisor("peers", children=[peer(name) for name in ("ada", "grace")]),
        otree.pool("inbox", {"message": deliver}, max_concurrency=8, lane_concurrency=1),
    ],
)
