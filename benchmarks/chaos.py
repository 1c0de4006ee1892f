"""Chaos: otree under random SIGKILLs, crashes, a crash storm and hostile control traffic.

``python -m benchmarks.chaos [--duration 120] [--seed N] [--only tree,pool,storm,control]``
runs four scenarios, ``--duration`` seconds of chaos split between them (30/25/15/30 %;
starting, draining and stopping add a few seconds each, every wait has a deadline),
and prints one row of figures per scenario:

1. **tree**: process children that fork grandchildren (in their group, orphaned into
   it, nested, churning) and ``setsid`` escapers, under cycles of: ``otree run``
   SIGKILLed at a random moment of its start; its guard SIGKILLed, then otree 0.5 s
   later (no child starts or stops in between); random SIGKILLs of children and
   grandchildren, then of otree; a clean stop (SIGTERM, during the start or after).
   Leftovers are counted 1 s after each SIGKILL of otree (escapers apart: that they
   survive one is the documented gap) and 1 s after each clean stop.
2. **pool**: a durable pool fed through ``otree submit`` and a protocol-level feeder
   while ``otree run`` is SIGKILLed again and again (now and then stopped cleanly) and
   restarted on the same state dir; then every job is left to finish. Each job records
   what it reports and when it finishes; the harness compares: lost jobs (accepted, never
   finished nor dead-lettered), duplicates (a job finished again after a SIGKILL of the
   otree that ran it is the documented at-least-once rerun, counted apart; any other is
   not), and the ledger's spend against the spend the jobs reported, job by job.
3. **storm**: 20 process children exiting 1 at once and 20 tasks raising within 10 ms,
   all restarted without pause; restarts/s, the RSS and fd count of ``otree run`` over
   time (their trend after a warm-up quarter), and the latency of ``status`` requests
   (p50/p99/max).
4. **control**: 100 ``events`` subscribers (the request ``otree events --follow`` sends;
   3 of them real ``otree events --follow`` commands), 16 clients that connect and send
   nothing, 16 that send a request one byte a second, 4 senders of malformed frames, and
   a burst of 500 concurrent clients; meanwhile a ``status`` request every 0.5 s (5 s
   deadline) and an ``otree status`` command every 2 s.

Exit 1 on a leftover after a clean stop (or a clean stop that hangs or does not exit 0;
a SIGTERM sent during the start may end Python by the signal before otree handles it:
that is counted apart), a lost job, a duplicate the at-least-once rule does not explain,
a spend mismatch, or an unanswered status; 130 if interrupted. Every process the run starts carries
``OTREE_CHAOS=<run id>`` (and ``OTREE_CHAOS_ROLE``) in its environment; whatever happens
(an exception, Ctrl-C, SIGTERM), all of them are found in /proc and SIGKILLed by pid at
the end (each pid checked again for the marker just before its SIGKILL) and the temp dir
is removed. Only a SIGKILL of the harness itself skips that: pass ``--run-id`` to be able
to find its processes then. No psutil: /proc only.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from otree._paths import control_socket, pool_database
from otree._protocol import (
    EXIT_NO_TREE,
    MAX_REPLY,
    MAX_REQUEST,
    VERSION,
    FrameError,
    FrameReader,
    Reply,
    Request,
    decode_reply,
    encode,
)

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent
MARK = "OTREE_CHAOS"
ROLE = "OTREE_CHAOS_ROLE"
SHARES = {"tree": 0.30, "pool": 0.25, "storm": 0.15, "control": 0.30}
GRACE = 1.0  # seconds a process may take to die after otree did, before it counts as left
STATUS_DEADLINE = 5.0  # a status request not answered within this is unanswered
UP_TIMEOUT = 30.0  # for `otree run` to answer on its socket (and start its children)
STOP_TIMEOUT = 30.0  # for `otree run` to exit after SIGTERM
CLI_TIMEOUT = 15.0  # for one `otree` client command (they have none of their own today)


# --- the run's processes ---------------------------------------------------------------------------


class Closing(Exception):
    """The run is ending: no process may be started any more."""


class Proc(NamedTuple):
    pid: int
    role: str  # otree, child, grand, escaper, client; a survivor with role otree is its guard


class Marks:
    """The processes of one chaos run: each carries ``OTREE_CHAOS=<run id>`` in its environment."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._field = f"{MARK}={run_id}".encode()
        self._role = f"{ROLE}=".encode()
        self._launched: list[subprocess.Popen[bytes]] = []
        self._closed = False
        self._lock = threading.Lock()  # no launch slips in while the run is closing

    def launch(
        self, argv: list[str], role: str, env: dict[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (never through a shell) as a process of this run playing ``role``.

        Raises:
          Closing: the run is ending; nothing new starts.
        """
        environ = {**os.environ, MARK: self.run_id, ROLE: role, **(env or {})}
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        with self._lock:
            if self._closed:
                raise Closing(self.run_id)
            proc = subprocess.Popen(argv, env=environ, **popen)
            self._launched = [*(p for p in self._launched if p.returncode is None), proc]
        return proc

    def close(self) -> int:
        """The run ends: launch nothing more, SIGKILL every process of it, reap the harness's own children.
        How many processes were killed."""
        with self._lock:
            self._closed = True
        killed = self.kill_all()
        for proc in self._launched:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
        return killed

    def role(self, pid: int) -> str | None:
        """The role of ``pid`` if it is a live process of this run (a zombie's environment reads empty)."""
        try:
            fields = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            return None
        if self._field not in fields:
            return None
        return next((f[len(self._role) :].decode() for f in fields if f.startswith(self._role)), "?")

    def scan(self) -> list[Proc]:
        """The live processes of this run."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (role := self.role(int(entry))) is not None:
                found.append(Proc(int(entry), role))
        return found

    def kill(self, pid: int) -> None:
        """SIGKILL ``pid`` if it is still a process of this run (a pid may be reused after a scan)."""
        if pid in (1, os.getpid(), os.getppid()) or self.role(pid) is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)

    def survivors(self, grace: float = GRACE) -> list[Proc]:
        """The run's processes (clients apart) still alive ``grace`` seconds from now (sooner if none)."""
        deadline = time.monotonic() + grace
        while True:
            left = [proc for proc in self.scan() if proc.role != "client"]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def kill_all(self, *, clients: bool = True, timeout: float = 10.0) -> int:
        """SIGKILL the run's processes by pid until none is left (or ``timeout``); how many there were."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            procs = [proc for proc in self.scan() if clients or proc.role != "client"]
            if not procs:
                break
            for proc in procs:
                self.kill(proc.pid)
                killed.add(proc.pid)
            time.sleep(0.02)
        return len(killed)


def children_of(pid: int) -> set[int]:
    """Pids whose parent is ``pid`` (any of its threads)."""
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                pids.update(int(child) for child in (task / "children").read_text().split())
    return pids


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- the control socket, with deadlines ------------------------------------------------------------


class Unanswered(Exception):
    """A request got no answer; the message says what happened instead."""


def open_control(path: Path, deadline: float) -> socket.socket:
    """Connect, waiting for room in a full listen backlog (as a blocking client does) until ``deadline``."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(os.fspath(path))
        except BlockingIOError:  # the backlog is full: a blocking connect() would wait here
            sock.close()
            if time.monotonic() >= deadline:
                raise TimeoutError("the listen backlog stayed full") from None
            time.sleep(0.01)
            continue
        except BaseException:
            sock.close()
            raise
        return sock


def read_reply(sock: socket.socket, deadline: float) -> Reply:
    reader = FrameReader(MAX_REPLY)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply")
        sock.settimeout(left)
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed without a reply")
        bodies = reader.feed(data)
        if bodies:
            return decode_reply(bodies[0])


def ask(sock_path: Path, op: str, timeout: float, /, **args: Any) -> Any:
    """One request; its result.

    Raises:
      Unanswered: no tree, no reply within ``timeout``, a reset, or an error reply.
    """
    deadline = time.monotonic() + timeout
    try:
        with open_control(sock_path, deadline) as sock:
            sock.sendall(encode(Request(VERSION, op, args)))
            reply = read_reply(sock, deadline)
    except (FileNotFoundError, ConnectionRefusedError):
        raise Unanswered("no tree") from None
    except TimeoutError:
        raise Unanswered("timeout") from None
    except (OSError, FrameError) as error:
        raise Unanswered(type(error).__name__) from None
    if not reply.ok:
        raise Unanswered(f"refused: {reply.error}")
    return reply.result


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


class Probe:
    """One kind of request, sent again and again, each under a deadline: latencies of the answered
    ones, reasons for the others. ``start`` sends one in a thread of its own, so an unanswered
    request never delays the next."""

    def __init__(self, request: Callable[[], object]) -> None:
        self.request = request  # raises Unanswered
        self.latencies: list[float] = []
        self.unanswered: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def once(self) -> None:
        t0 = time.monotonic()
        try:
            self.request()
        except Unanswered as error:
            with self._lock:
                self.unanswered[str(error)[:60]] += 1
            return
        with self._lock:
            self.latencies.append(time.monotonic() - t0)

    def start(self) -> None:
        thread = threading.Thread(target=self.once, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()  # each request has its deadline

    @property
    def missed(self) -> int:
        return sum(self.unanswered.values())

    def summary(self) -> str:
        total = len(self.latencies) + self.missed
        text = f"unanswered {self.missed} of {total}"
        if self.unanswered:
            text += " (" + ", ".join(f"{why}: {n}" for why, n in self.unanswered.most_common(3)) + ")"
        if self.latencies:
            ms = sorted(v * 1e3 for v in self.latencies)
            text += (
                f", p50 {percentile(ms, 0.5):.1f} ms p99 {percentile(ms, 0.99):.1f} ms max {ms[-1]:.1f} ms"
            )
        return text


def status_probe(sock_path: Path, timeout: float = STATUS_DEADLINE) -> Probe:
    """A probe of ``status`` requests on the socket."""
    return Probe(lambda: ask(sock_path, "status", timeout, path=""))


def otree_command(ctx: Context, state: Path, *argv: str, timeout: float = CLI_TIMEOUT) -> tuple[int, str]:
    """Run an ``otree`` client command (marked as a client); (exit code, or -1 on timeout; stderr)."""
    try:
        proc = ctx.marks.launch(
            [PY, "-m", "otree", *argv, "--state-dir", str(state)],
            "client",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except Closing:
        return -1, "the chaos run is ending"
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return -1, f"no answer within {timeout:g} s"
    return proc.returncode, stderr.decode(errors="replace")


def command_probe(ctx: Context, state: Path, *argv: str) -> Probe:
    """A probe of an ``otree`` command: exit 0 within CLI_TIMEOUT, or unanswered (its last stderr line)."""

    def command() -> None:
        code, stderr = otree_command(ctx, state, *argv)
        if code != 0:
            raise Unanswered((stderr.strip().splitlines() or [f"exit {code}"])[-1])

    return Probe(command)


# --- one otree run ---------------------------------------------------------------------------------


@dataclass
class Context:
    """What a scenario gets: the run's marks, its own directory, the random source, its seconds."""

    marks: Marks
    dir: Path
    rng: random.Random
    seconds: float


class Run:
    """One ``otree run`` started by the harness: its own session, stderr appended to a file."""

    def __init__(self, ctx: Context, tree: Path, state: Path, **env: str) -> None:
        self.marks = ctx.marks
        self.stderr = ctx.dir / "otree.stderr"
        self._stderr_at = self.stderr.stat().st_size if self.stderr.exists() else 0
        with self.stderr.open("ab") as log:
            self.proc = ctx.marks.launch(
                [PY, "-m", "otree", "run", str(tree), "--state-dir", str(state)],
                "otree",
                env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.socket = control_socket(state)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def answers(self, timeout: float = UP_TIMEOUT, until: Callable[[], bool] = lambda: True) -> bool:
        """Whether it answers ``status`` (and ``until()`` holds) within ``timeout``; False if it exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                ask(self.socket, "status", min(2.0, max(deadline - time.monotonic(), 0.01)), path="")
            except Unanswered:
                time.sleep(0.05)
                continue
            if until():
                return True
            time.sleep(0.05)
        return False

    def why_not_up(self) -> str:
        """The exit code and the last line this run wrote to stderr."""
        with self.stderr.open("rb") as log:
            log.seek(self._stderr_at)
            lines = log.read().decode(errors="replace").strip().splitlines()
        code = self.proc.poll()
        state = "still running" if code is None else f"exit {code}"
        return f"{state}: {lines[-1][:100] if lines else '(nothing on stderr)'}"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM; its exit code, or None if it did not exit within STOP_TIMEOUT (then SIGKILLed)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill_guard(self) -> bool:
        """SIGKILL otree's guard (the spawn helper): its child that is none of the tree's processes
        (those carry a role of their own; the guard has otree's environment, or none of ours). A
        child the helper has just cloned looks the same until it execs, so the oldest one is taken:
        the helper outlives every clone. False if there is none."""
        candidates = [pid for pid in children_of(self.pid) if self.marks.role(pid) in ("otree", None)]
        ages = {pid: start for pid in candidates if (start := start_time(pid)) is not None}
        if not ages:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(min(ages, key=ages.__getitem__), signal.SIGKILL)  # otree's child: not a stranger's
        return True


def label(proc: Proc) -> str:
    return "guard" if proc.role == "otree" else proc.role


@dataclass
class CleanStops:
    """Clean stops (SIGTERM -> exit 0) and what each one left behind."""

    stops: int = 0
    hung: int = 0
    bad_exits: Counter[int] = field(default_factory=Counter)
    unhandled: int = 0  # SIGTERMs that came while Python was still starting: they end it, as they should
    left: Counter[str] = field(default_factory=Counter)  # by role

    def stop(self, run: Run, *, starting: bool = False) -> None:
        """SIGTERM ``run``; ``starting``: it may not have set up its signal handling yet."""
        self.stops += 1
        code = run.stop()
        if code is None:
            self.hung += 1
        elif starting and code == -signal.SIGTERM:
            self.unhandled += 1
        elif code != 0:
            self.bad_exits[code] += 1
        survivors = run.marks.survivors()
        self.left.update(label(proc) for proc in survivors)
        run.marks.kill_all(clients=False)

    def figures(self) -> str:
        left = sum(self.left.values())
        roles = ", ".join(f"{role} {n}" for role, n in self.left.most_common())
        exits = ", ".join(f"exit {code}: {n}" for code, n in sorted(self.bad_exits.items()))
        return (
            f"clean stops {self.stops}: left after {GRACE:g} s {left}{f' ({roles})' if roles else ''}, "
            f"hung {self.hung}, exit != 0 {sum(self.bad_exits.values())}{f' ({exits})' if exits else ''}"
            + (f", killed by the SIGTERM while Python started {self.unhandled}" if self.unhandled else "")
        )

    def failures(self) -> list[str]:
        found = []
        if self.left:
            found.append(f"{sum(self.left.values())} processes left after {self.stops} clean stops")
        if self.hung:
            found.append(f"{self.hung} clean stops did not exit within {STOP_TIMEOUT:g} s")
        if self.bad_exits:
            found.append(f"{sum(self.bad_exits.values())} clean stops did not exit 0")
        return found


@dataclass
class Row:
    """One scenario's line of the table: its figures, what fails the run, what is only noted."""

    name: str
    figures: list[str]
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- 1. the process tree ---------------------------------------------------------------------------

PROCESS_TREE = """\
import otree

SHAPES = {
    # two grandchildren in the child's group
    "forker": "OTREE_CHAOS_ROLE=grand sleep 3600 & OTREE_CHAOS_ROLE=grand sleep 3600 & wait",
    # a grandchild that leaves the group and session
    "escaper": "(OTREE_CHAOS_ROLE=escaper setsid sh -c 'sleep 3600; true' &); exec sleep 3600",
    # a grandchild orphaned into otree (the subreaper), still in the group
    "orphaner": "(OTREE_CHAOS_ROLE=grand sleep 3600 &); exec sleep 3600",
    # a great-grandchild
    "nester": "OTREE_CHAOS_ROLE=grand sh -c 'sleep 3600 & wait' & wait",
    # short-lived grandchildren, born all the time
    "spawner": "while :; do OTREE_CHAOS_ROLE=grand sleep 0.3; done",
}


def child(name, shape):
    return otree.process(
        name, ["sh", "-c", SHAPES[shape]], env={"OTREE_CHAOS_ROLE": "child"},
        stdout="null", stderr="null", shutdown=2.0,
    )


tree = otree.supervisor("chaos", max_restarts=10**9, max_seconds=1.0, children=[
    *[child(f"{shape}{i}", shape) for shape in SHAPES
      for i in range(2 if shape in ("forker", "escaper") else 1)],
    otree.supervisor("sub", max_restarts=10**9, max_seconds=1.0, children=[
        child("forker", "forker"), child("escaper", "escaper"), child("orphaner", "orphaner"),
    ]),
])
"""
LEADERS = 10  # process children in PROCESS_TREE
CYCLES = ("start-kill", "guard-first", "random-kill", "clean-stop")


@dataclass
class TreeChaos:
    """The process tree's cycles (one ``otree run`` each, on the same state dir) and what they left."""

    ctx: Context
    tree: Path
    state: Path
    cycles: Counter[str] = field(default_factory=Counter)
    left: Counter[str] = field(default_factory=Counter)  # in-group leftovers after a SIGKILL, by cycle
    left_roles: Counter[str] = field(default_factory=Counter)
    escaped: int = 0  # setsid escapers left after a SIGKILL of otree: the documented gap
    otree_kills: int = 0
    child_kills: int = 0
    failed_starts: list[str] = field(default_factory=list)
    no_guard: int = 0
    up_seconds: list[float] = field(default_factory=list)
    stops: CleanStops = field(default_factory=CleanStops)

    def cycle(self, kind: str) -> None:
        rng = self.ctx.rng
        self.cycles[kind] += 1
        t0 = time.monotonic()
        run = Run(self.ctx, self.tree, self.state)
        typical_start = statistics.median(self.up_seconds) if self.up_seconds else 1.0
        if kind == "start-kill" or (kind == "clean-stop" and rng.random() < 0.3):
            time.sleep(rng.uniform(0, 1.2 * typical_start))  # somewhere in the start
            self.end(run, kind, starting=True)
            return
        if not run.answers(until=lambda: sum(p.role == "child" for p in self.ctx.marks.scan()) >= LEADERS):
            self.failed_starts.append(run.why_not_up())
            run.kill()
            self.ctx.marks.kill_all()
            return
        self.up_seconds.append(time.monotonic() - t0)
        if kind == "guard-first":
            if run.kill_guard():
                time.sleep(0.5)  # time for otree to notice; no child starts or stops meanwhile
            else:
                self.no_guard += 1
        else:
            self.kill_randomly(rng.uniform(1.0, 3.0) if kind == "random-kill" else rng.uniform(0, 1.5))
        self.end(run, kind)

    def kill_randomly(self, seconds: float) -> None:
        """SIGKILL random children and grandchildren for ``seconds``."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            victims = [p for p in self.ctx.marks.scan() if p.role in ("child", "grand")]
            if victims:
                self.ctx.marks.kill(self.ctx.rng.choice(victims).pid)
                self.child_kills += 1
            time.sleep(self.ctx.rng.uniform(0.05, 0.3))

    def end(self, run: Run, kind: str, *, starting: bool = False) -> None:
        if kind == "clean-stop":
            self.stops.stop(run, starting=starting)
            return
        run.kill()
        self.otree_kills += 1
        survivors = self.ctx.marks.survivors()
        for proc in survivors:
            if proc.role == "escaper":
                self.escaped += 1
            else:
                self.left[kind] += 1
                self.left_roles[label(proc)] += 1
        self.ctx.marks.kill_all()

    def row(self) -> Row:
        in_group = sum(self.left.values())
        by_cycle = ", ".join(f"{kind} {self.left[kind]}" for kind in CYCLES if kind != "clean-stop")
        roles = ", ".join(f"{role} {n}" for role, n in self.left_roles.most_common())
        row = Row(
            "tree",
            [
                f"cycles {sum(self.cycles.values())} ("
                + ", ".join(f"{kind} {self.cycles[kind]}" for kind in CYCLES)
                + ")",
                f"otree SIGKILLs {self.otree_kills}: left after {GRACE:g} s {in_group} ({by_cycle}"
                + (f"; {roles}" if roles else "")
                + f"), setsid escapers {self.escaped} (documented gap)",
                self.stops.figures(),
                f"children/grandchildren SIGKILLed {self.child_kills}, failed starts "
                f"{len(self.failed_starts)}, guard not found {self.no_guard}",
            ],
            self.stops.failures(),
        )
        if in_group:
            row.notes.append(
                f"{in_group} processes of children's groups outlived a SIGKILL of otree by {GRACE:g} s"
            )
        row.notes += [f"failed start: {why}" for why in self.failed_starts[:3]]
        if self.no_guard:
            row.notes.append(f"{self.no_guard} times no guard process was found under a running tree")
        return row


def scenario_tree(ctx: Context) -> Row:
    tree = ctx.dir / "tree.py"
    tree.write_text(PROCESS_TREE)
    chaos = TreeChaos(ctx, tree, ctx.dir / "state")
    deadline = time.monotonic() + ctx.seconds
    order: list[str] = []
    while time.monotonic() < deadline:
        if not order:
            order = ctx.rng.sample(CYCLES, len(CYCLES))
        chaos.cycle(order.pop())
    chaos.cycle("clean-stop")  # at least one, whatever the duration
    return chaos.row()


# --- 2. the durable pool ---------------------------------------------------------------------------

POOL_TREE = """\
import json
import os
import random

import trio

import otree

RECORDS = os.environ["CHAOS_RECORDS"]


def record(**fields):
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(fields) + "\\n").encode())
    finally:
        os.close(fd)


async def work(payload):
    me = otree.current_child()
    job = me.path.rsplit("/", 1)[1]
    await trio.sleep(random.uniform(0, 0.05))
    micros = random.randint(1, 5000)
    nonce = os.urandom(8).hex()
    record(e="report", tag=payload["tag"], job=job, pid=os.getpid(), nonce=nonce, micros=micros)
    me.report_cost(micros / 1e6)
    record(e="charged", nonce=nonce)
    if random.random() < payload["fail"]:
        raise RuntimeError("chaos: a planned failure")
    record(e="done", tag=payload["tag"], job=job, pid=os.getpid())
    return payload["tag"]


tree = otree.supervisor("chaos", children=[
    otree.pool("jobs", {"work": work}, max_concurrency=4, max_queue=100_000, max_attempts=2,
               daily_budget=1000.0),
])
"""
POOL_PATH = "chaos/jobs"
FAIL_RATE = 0.15  # of attempts; with two attempts about 2 % of jobs are dead-lettered
DRAIN_TIMEOUT = 90.0


class Feeders:
    """Submitters of uniquely tagged jobs: two loops of ``otree submit``, one protocol-level feeder."""

    def __init__(self, ctx: Context, state: Path) -> None:
        self.ctx = ctx
        self.state = state
        self.socket = control_socket(state)
        self.acked: dict[str, str] = {}  # tag -> who: "cli" or "protocol"
        self.unacked: set[str] = set()  # sent, but no answer: maybe queued, maybe not
        self.refused: Counter[str] = Counter()
        self.tracebacks = 0
        self.hung = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._cli, args=(k,), daemon=True, name=f"cli-feeder-{k}")
            for k in range(2)
        ]
        self._threads.append(threading.Thread(target=self._protocol, daemon=True, name="feeder"))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self, *, wait: bool = True) -> None:
        self._stop.set()
        for thread in self._threads if wait else ():
            thread.join(CLI_TIMEOUT + 5)

    @staticmethod
    def payload(tag: str) -> dict[str, Any]:
        return {"tag": tag, "fail": FAIL_RATE}

    def _cli(self, k: int) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            tag = f"cli{k}-{n}"
            code, stderr = otree_command(
                self.ctx,
                self.state,
                "submit",
                "jobs",
                "work",
                json.dumps(self.payload(tag)),
                "--key",
                tag,
                "--cost",
                "0.001",
                "--json",
            )
            with self._lock:
                if code == 0:
                    self.acked[tag] = "cli"
                elif code == EXIT_NO_TREE:
                    self.refused["no tree"] += 1
                else:
                    self.unacked.add(tag)
                    self.tracebacks += "Traceback" in stderr
                    self.hung += code == -1
            if code == EXIT_NO_TREE:
                time.sleep(0.1)

    def _protocol(self) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            tag = f"api-{n}"
            args = {"pool": "jobs", "kind": "work", "payload": self.payload(tag), "cost": 0.001, "key": tag}
            try:
                ask(self.socket, "submit", 5.0, **args)
            except Unanswered as error:
                why = str(error)
                with self._lock:
                    if why == "no tree" or why.startswith("refused"):
                        self.refused[why[:40]] += 1
                    else:
                        self.unacked.add(tag)
                time.sleep(0.05)
                continue
            with self._lock:
                self.acked[tag] = "protocol"
            time.sleep(0.02)


@dataclass
class PoolVerdict:
    """What the records, the dead letters and the ledger say about the jobs."""

    finished: int  # tags finished at least once
    lost: list[str]  # accepted, never finished, not dead-lettered
    reruns: int  # finishes repeated because otree was SIGKILLed after one (at-least-once)
    duplicates: list[str]  # tags finished again for any other reason
    ran_unacked: int  # finished although their submitter got no answer
    ledger: int  # micro-dollars in the ledger
    reported: int  # micro-dollars the jobs confirmed reporting
    unconfirmed: int  # reports a SIGKILL may have cut off before the ledger had them
    mismatched: list[str]  # job ids whose ledger spend no reading of their reports explains

    def failures(self) -> list[str]:
        found = []
        if self.lost:
            found.append(f"{len(self.lost)} jobs lost (e.g. {', '.join(self.lost[:5])})")
        if self.duplicates:
            found.append(
                f"{len(self.duplicates)} jobs finished again without a SIGKILL to explain it "
                f"(e.g. {', '.join(self.duplicates[:5])})"
            )
        if self.mismatched:
            found.append(
                f"ledger spend differs from reported spend for {len(self.mismatched)} jobs "
                f"(e.g. job {', '.join(self.mismatched[:5])})"
            )
        return found


def _explains(rest: int, unsure: list[int]) -> bool:
    """Whether ``rest`` micro-dollars are the sum of some of the unconfirmed reports."""
    if len(unsure) > 16:  # too many to try every subset: bounds only
        return 0 <= rest <= sum(unsure)
    return any(
        sum(combo) == rest
        for size in range(len(unsure) + 1)
        for combo in itertools.combinations(unsure, size)
    )


def judge_pool(
    acked: Iterable[str],
    records: list[dict[str, Any]],
    killed: set[int],
    dead: Iterable[str],
    ledger: dict[str, int],
) -> PoolVerdict:
    """Compare what was accepted, what the jobs recorded, what was dead-lettered and the ledger.

    ``records`` are the jobs' own lines: ``report`` (tag, job, pid, nonce, micros) before
    ``report_cost``, ``charged`` (nonce) after it, ``done`` (tag, job, pid) before returning.
    ``killed`` holds the pids of the ``otree run`` processes that were SIGKILLed.
    """
    done: dict[str, list[int]] = {}
    charged = {r["nonce"] for r in records if r["e"] == "charged"}
    confirmed: Counter[str] = Counter()
    unsure: dict[str, list[int]] = {}
    for r in records:
        if r["e"] == "done":
            done.setdefault(r["tag"], []).append(r["pid"])
        elif r["e"] == "report":
            if r["nonce"] in charged:
                confirmed[r["job"]] += r["micros"]
            else:
                unsure.setdefault(r["job"], []).append(r["micros"])
    acked = set(acked)
    reruns = 0
    duplicates = []
    for tag, pids in done.items():
        earlier = pids[:-1]
        if len(set(pids)) == len(pids) and all(pid in killed for pid in earlier):
            reruns += len(earlier)
        else:
            duplicates.append(tag)
    jobs = sorted({*ledger, *confirmed, *unsure}, key=lambda job: (len(job), job))
    return PoolVerdict(
        finished=len(done),
        lost=sorted(acked - done.keys() - set(dead)),
        reruns=reruns,
        duplicates=sorted(duplicates),
        ran_unacked=len(done.keys() - acked),
        ledger=sum(ledger.values()),
        reported=sum(confirmed.values()),
        unconfirmed=sum(len(values) for values in unsure.values()),
        mismatched=[j for j in jobs if not _explains(ledger.get(j, 0) - confirmed[j], unsure.get(j, []))],
    )


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The jobs' records, and how many lines were torn (not JSON)."""
    records, torn = [], 0
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                torn += 1
    return records, torn


def read_pool_database(path: Path) -> tuple[dict[str, int], dict[str, str], int]:
    """(micro-dollars by job id, dead letters' error by tag, jobs still stored) from a stopped pool's file."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        ledger = {
            str(job): int(micros)
            for job, micros in db.execute("SELECT job, sum(micros) FROM ledger GROUP BY job")
        }
        dead = {
            json.loads(payload)["tag"]: error
            for payload, error in db.execute("SELECT payload, error FROM dead")
        }
        stored = int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])
    return ledger, dead, stored


def drain(run: Run) -> bool:
    """Wait until the pool has nothing running, queued or waiting for a retry."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        try:
            jobs = ask(run.socket, "jobs", STATUS_DEADLINE, pool="jobs")
        except Unanswered:
            jobs = None
        if jobs is not None and not (jobs["running"] or jobs["queued"] or jobs["retrying"]):
            return True
        time.sleep(0.2)
    return False


def scenario_pool(ctx: Context) -> Row:
    tree, state, records = ctx.dir / "tree.py", ctx.dir / "state", ctx.dir / "records.jsonl"
    tree.write_text(POOL_TREE)
    stops = CleanStops()
    killed: set[int] = set()
    failed_starts: list[str] = []

    def launch() -> Run:
        for _ in range(3):
            run = Run(ctx, tree, state, CHAOS_RECORDS=str(records))
            if run.answers():
                return run
            failed_starts.append(run.why_not_up())
            run.kill()
        raise RuntimeError(f"otree run of the pool tree does not start: {failed_starts[-1]}")

    run = launch()
    feeders = Feeders(ctx, state)
    feeders.start()
    deadline = time.monotonic() + ctx.seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(max(0.0, min(deadline - time.monotonic(), ctx.rng.uniform(0.5, 2.5))))
            if ctx.rng.random() < 0.2:
                stops.stop(run)
            else:
                run.kill()
                killed.add(run.pid)
            if ctx.rng.random() < 0.3:
                time.sleep(ctx.rng.uniform(0, 0.5))  # submissions meanwhile find no tree
            run = launch()
    except BaseException:
        feeders.close(wait=False)  # the run is ending: its processes are killed anyway
        raise
    feeders.close()
    drained = drain(run)
    stops.stop(run)
    ledger, dead, stored = read_pool_database(pool_database(state, POOL_PATH))
    lines, torn = read_records(records)
    verdict = judge_pool(feeders.acked, lines, killed, dead, ledger)
    by_whom = Counter(feeders.acked.values())
    interrupted = sum(error.startswith("interrupted") for error in dead.values())
    row = Row(
        "pool",
        [
            f"accepted {len(feeders.acked)} (otree submit {by_whom['cli']}, protocol {by_whom['protocol']}), "
            f"refused while down {sum(feeders.refused.values())}, unanswered {len(feeders.unacked)} "
            f"(of which ran {verdict.ran_unacked})",
            f"otree SIGKILLs {len(killed)}, {stops.figures()}",
            f"finished {verdict.finished}, dead-lettered {len(dead)} ({interrupted} after 3 interruptions), "
            f"lost {len(verdict.lost)}, reruns after a SIGKILL {verdict.reruns} (at-least-once), "
            f"other duplicates {len(verdict.duplicates)}",
            f"spend: ledger ${verdict.ledger / 1e6:.6f}, reported ${verdict.reported / 1e6:.6f} "
            f"(+{verdict.unconfirmed} reports cut off by a SIGKILL), "
            f"jobs mismatched {len(verdict.mismatched)}",
            f"drained {'yes' if drained else 'no'} ({stored} jobs still stored); otree submit: "
            f"tracebacks {feeders.tracebacks}, no answer within {CLI_TIMEOUT:g} s {feeders.hung}",
        ],
        stops.failures() + verdict.failures(),
    )
    if not feeders.acked:
        row.failures.append("no job was accepted: the scenario tested nothing")
    if feeders.tracebacks:
        row.notes.append(f"otree submit printed a traceback {feeders.tracebacks} times")
    if torn:
        row.notes.append(f"{torn} torn record lines")
    row.notes += [f"failed start: {why}" for why in failed_starts[:3]]
    return row


# --- 3. the crash storm ----------------------------------------------------------------------------

STORM_TREE = """\
import os
import random

import trio

import otree


async def crash():
    fd = os.open(os.environ["CHAOS_COUNTER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, b"t\\n")
    os.close(fd)
    await trio.sleep(random.uniform(0, 0.01))
    raise RuntimeError("storm")


tree = otree.supervisor("storm", max_restarts=10**9, max_seconds=1.0, children=[
    *[otree.process(f"p{i}", ["sh", "-c", 'echo p >> "$CHAOS_COUNTER"; exit 1'], stdout="null", stderr="log")
      for i in range(20)],
    *[otree.task(f"t{i}", crash) for i in range(20)],
])
"""


def trend(samples: list[tuple[float, int]]) -> tuple[int, int, float]:
    """(first, last, least-squares slope per minute) of (seconds, value) samples after a warm-up quarter."""
    kept = samples[len(samples) // 4 :]
    if len(kept) < 2:
        return (kept[0][1], kept[0][1], 0.0) if kept else (0, 0, 0.0)
    slope = statistics.linear_regression([t for t, _ in kept], [float(v) for _, v in kept]).slope
    return kept[0][1], kept[-1][1], slope * 60


def scenario_storm(ctx: Context) -> Row:
    tree, counter = ctx.dir / "tree.py", ctx.dir / "starts"
    tree.write_text(STORM_TREE)
    stops = CleanStops()
    run = Run(ctx, tree, ctx.dir / "state", CHAOS_COUNTER=str(counter))
    if not run.answers():
        why = run.why_not_up()
        run.kill()
        return Row("storm", [], [f"otree run of the storm tree did not start: {why}"])
    probe = status_probe(run.socket)
    rss: list[tuple[float, int]] = []
    fds: list[tuple[float, int]] = []
    t0 = time.monotonic()
    starts0 = counter.read_bytes() if counter.exists() else b""
    died = False
    while (now := time.monotonic()) < t0 + ctx.seconds:
        probe.start()
        try:
            rss.append((now - t0, rss_kib(run.pid)))
            fds.append((now - t0, fd_count(run.pid)))
        except OSError:
            died = True
            break
        time.sleep(max(0.0, 0.5 - (time.monotonic() - now)))
    elapsed = time.monotonic() - t0
    starts = counter.read_bytes()
    probe.join()
    died = died or run.proc.poll() is not None
    stops.stop(run)
    rss_first, rss_last, rss_slope = trend(rss)
    fd_first, fd_last, fd_slope = trend(fds)
    row = Row(
        "storm",
        [
            f"restarts/s: processes {(starts.count(b'p') - starts0.count(b'p')) / elapsed:.0f}, "
            f"tasks {(starts.count(b't') - starts0.count(b't')) / elapsed:.0f} (over {elapsed:.0f} s)",
            f"RSS {rss_first / 1024:.1f} -> {rss_last / 1024:.1f} MiB ({rss_slope / 1024:+.2f} MiB/min), "
            f"fds {fd_first} -> {fd_last} ({fd_slope:+.1f}/min)",
            f"status every 0.5 s: {probe.summary()}",
            stops.figures(),
        ],
        stops.failures(),
    )
    if probe.missed:
        row.failures.append(f"{probe.missed} status requests unanswered within {STATUS_DEADLINE:g} s")
    if died:
        row.failures.append("otree run exited during the storm")
    return row


# --- 4. hostile control traffic --------------------------------------------------------------------

CONTROL_TREE = """\
import trio

import otree


async def idle():
    await trio.sleep_forever()


async def flap():
    await trio.sleep(0.2)
    raise RuntimeError("flap")


tree = otree.supervisor("hostile", max_restarts=10**9, max_seconds=1.0, children=[
    *[otree.task(f"idle{i}", idle) for i in range(10)],
    otree.task("flap", flap),
    otree.process("proc", ["sh", "-c", "sleep 0.5; exit 1"], stdout="null", stderr="null"),
])
"""
FOLLOWERS, CLI_FOLLOWERS, SILENT, TRICKLING, MALFORMED_SENDERS, BURST = 100, 3, 16, 16, 4, 500
BURST_DEADLINE = 15.0
_HEADER = struct.Struct(">I")


def _frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


def malformed_frame(rng: random.Random) -> bytes:
    """One of the ways a request can be wrong (none of them may do anything to the tree)."""
    noise = rng.randbytes(rng.randrange(1, 200))
    pack = msgspec.msgpack.encode
    choices = (
        noise,  # no frame at all
        _HEADER.pack(MAX_REQUEST + 1) + noise,  # over the limit
        _frame(noise),  # not msgpack
        _frame(pack([1, 2, 3])),  # msgpack, not a request
        _frame(pack({"v": VERSION + 98, "op": "status", "args": {}})),  # another version
        _frame(pack({"v": VERSION, "op": "no_such_op", "args": {}})),  # unknown request
        _frame(pack({"v": VERSION, "op": "status", "args": {"path": 12, "extra": True}})),  # bad arguments
        _HEADER.pack(100) + noise[:50],  # truncated, then EOF
        _frame(b"\x91" * 100_000 + b"\xc0"),  # nested too deeply
        _HEADER.pack(0),  # empty
    )
    return rng.choice(choices)


class Hostile:
    """Hostile clients of one control socket, each in a thread, until ``close``."""

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        self.seed = seed
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # socket errors nobody planned for, by client and kind
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            if not self.stop.is_set():
                self.counts[key] += n

    def spawn(self, target: Callable[..., None], *args: Any) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except OSError as error:  # an unforeseen socket failure: counted, not fatal to the harness
                with self._lock:
                    self.errors[f"{target.__name__}: {type(error).__name__}"] += 1

        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        """Stop every client; the figures are what was counted until now (not what the stop shakes loose)."""
        with self._lock:
            self.stop.set()
        for thread in self._threads:
            thread.join(5.0)

    def _connect(self) -> socket.socket | None:
        """A connection within 5 s, else None."""
        try:
            return open_control(self.path, time.monotonic() + 5.0)
        except OSError:
            return None

    def _connected(self) -> socket.socket | None:
        """A connection, however long the tree makes us wait; None once the clients stop."""
        while not self.stop.is_set():
            sock = self._connect()
            if sock is not None:
                return sock
            time.sleep(0.5)
        return None

    def _receive(self, sock: socket.socket) -> bytes | None:
        """The next bytes from the tree (empty: it closed the connection); None once the clients stop."""
        sock.settimeout(0.5)
        while not self.stop.is_set():
            try:
                return sock.recv(1 << 16)
            except TimeoutError:
                continue
        return None

    def follow(self) -> None:
        """Subscribe to the events (``otree events --follow``'s request) and read them until closed."""
        sock = self._connected()
        if sock is None:
            return
        with sock:
            sock.sendall(encode(Request(VERSION, "events", {"path": "", "kind": "", "since": None})))
            reader = FrameReader(MAX_REPLY)
            first = True
            while (data := self._receive(sock)) is not None:
                if not data:
                    self.bump("follow: closed by the tree")
                    return
                for body in reader.feed(data):
                    ok = decode_reply(body).ok
                    if first:
                        self.bump("follow: subscribed" if ok else "follow: refused")
                        first = False
                    elif ok:
                        self.bump("follow: events")

    def silent(self) -> None:
        """Connect and say nothing, again and again."""
        while (sock := self._connected()) is not None:
            with sock:
                data = self._receive(sock)
                if data is not None:
                    self.bump("silent: dropped by the tree" if data else "silent: closed by the tree")

    def trickle(self) -> None:
        """Send a status request one byte a second, again and again."""
        request = encode(Request(VERSION, "status", {"path": ""}))
        while (sock := self._connected()) is not None:
            with sock:
                self._trickle_one(sock, request)

    def _trickle_one(self, sock: socket.socket, request: bytes) -> None:
        sock.settimeout(1.0)
        for i in range(len(request)):
            if self.stop.is_set():
                return
            try:
                sock.sendall(request[i : i + 1])
                if i < len(request) - 1:
                    sock.recv(1 << 16)  # the one-second pause: anything but a timeout ends it
                    self.bump("trickle: dropped by the tree")  # it answered (or closed) before the end
                    return
            except TimeoutError:
                continue
            except OSError:
                self.bump("trickle: dropped by the tree")
                return
        try:
            answered = read_reply(sock, time.monotonic() + STATUS_DEADLINE).ok
        except (OSError, FrameError):
            answered = False
        self.bump("trickle: answered" if answered else "trickle: unanswered")

    def malformed(self, k: int) -> None:
        """Send malformed frames, one per connection; count how each was answered."""
        rng = random.Random(self.seed + k)
        while not self.stop.is_set():
            sock = self._connect()
            if sock is None:
                self.bump("malformed: no connection")
                time.sleep(0.1)
                continue
            with sock:
                self.bump("malformed: sent")
                try:
                    sock.sendall(malformed_frame(rng))
                    sock.shutdown(socket.SHUT_WR)
                    reply = read_reply(sock, time.monotonic() + STATUS_DEADLINE)
                except TimeoutError:
                    self.bump("malformed: no reply in time")
                except ConnectionError:
                    self.bump("malformed: closed without a reply")
                except FrameError:
                    self.bump("malformed: a malformed reply")
                else:
                    self.bump("malformed: error reply" if not reply.ok else "malformed: accepted")

    def figures(self) -> list[str]:
        c = self.counts
        odd = ", ".join(f"{key} {n}" for key, n in self.errors.most_common())
        return [
            f"malformed frames {c['malformed: sent']}: error reply {c['malformed: error reply']}, "
            f"closed without a reply {c['malformed: closed without a reply']}, "
            f"no reply in {STATUS_DEADLINE:g} s {c['malformed: no reply in time']}, "
            f"accepted {c['malformed: accepted']}, no connection within 5 s {c['malformed: no connection']}",
            f"slow clients ({SILENT} silent, {TRICKLING} at 1 byte/s): silent dropped by the tree "
            f"{c['silent: dropped by the tree'] + c['silent: closed by the tree']}, trickling answered "
            f"{c['trickle: answered']}, dropped {c['trickle: dropped by the tree']}, "
            f"unanswered {c['trickle: unanswered']}",
            f"followers {FOLLOWERS} ({CLI_FOLLOWERS} of them otree events --follow, not counted here): "
            f"subscribed {c['follow: subscribed']}, refused {c['follow: refused']}, "
            f"closed by the tree {c['follow: closed by the tree']}, events received {c['follow: events']}"
            + (f"; socket errors: {odd}" if odd else ""),
        ]


def scenario_control(ctx: Context) -> Row:
    tree, state = ctx.dir / "tree.py", ctx.dir / "state"
    tree.write_text(CONTROL_TREE)
    stops = CleanStops()
    run = Run(ctx, tree, state)
    if not run.answers():
        why = run.why_not_up()
        run.kill()
        return Row("control", [], [f"otree run of the control tree did not start: {why}"])
    fds_before = fd_count(run.pid)
    hostile = Hostile(run.socket, ctx.rng.randrange(2**32))
    cli_followers = [
        ctx.marks.launch(
            [PY, "-m", "otree", "events", "--follow", "--state-dir", str(state)],
            "client",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(CLI_FOLLOWERS)
    ]
    for _ in range(FOLLOWERS - CLI_FOLLOWERS):
        hostile.spawn(hostile.follow)
    for _ in range(SILENT):
        hostile.spawn(hostile.silent)
    for _ in range(TRICKLING):
        hostile.spawn(hostile.trickle)
    for k in range(MALFORMED_SENDERS):
        hostile.spawn(hostile.malformed, k)
    probe, burst = status_probe(run.socket), status_probe(run.socket, BURST_DEADLINE)
    command = command_probe(ctx, state, "status")
    t0 = time.monotonic()
    for tick in itertools.count():
        now = time.monotonic()
        if now >= t0 + ctx.seconds:
            break
        if tick == int(ctx.seconds / 3 / 0.5):
            for _ in range(BURST):
                burst.start()
        probe.start()
        if tick % 4 == 0:
            command.start()
        time.sleep(max(0.0, 0.5 - (time.monotonic() - now)))
    for each in (probe, command, burst):  # the requests in flight end (or time out) under the traffic
        each.join()
    hostile.close()
    fds_after = fd_count(run.pid) if run.proc.poll() is None else -1
    stops.stop(run)
    followers_left, follower_errors = 0, Counter[str]()
    for proc in cli_followers:  # they end with the tree
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            followers_left += 1
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        follower_errors.update(line.decode(errors="replace")[:80] for line in proc.stderr.read().splitlines())
        proc.stderr.close()
    row = Row(
        "control",
        [
            *hostile.figures(),
            f"{BURST} concurrent status requests ({BURST_DEADLINE:g} s deadline): {burst.summary()}",
            f"status every 0.5 s ({STATUS_DEADLINE:g} s deadline): {probe.summary()}",
            f"otree status every 2 s ({CLI_TIMEOUT:g} s deadline): {command.summary()}",
            f"otree fds {fds_before} before, {fds_after} after the traffic; {stops.figures()}; "
            f"otree events --follow still running 5 s after the stop: {followers_left}",
        ],
        stops.failures(),
    )
    probes = (
        ("status requests", probe),
        ("burst status requests", burst),
        ("otree status commands", command),
    )
    for what, missed in ((what, p.missed) for what, p in probes):
        if missed:
            row.failures.append(f"{missed} {what} unanswered")
    row.notes += [f"otree events --follow said ({n}x): {line}" for line, n in follower_errors.most_common(3)]
    if hostile.counts["malformed: accepted"]:
        row.notes.append(f"{hostile.counts['malformed: accepted']} malformed frames got an ok reply")
    return row


# --- the run ---------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Context], Row]] = {
    "tree": scenario_tree,
    "pool": scenario_pool,
    "storm": scenario_storm,
    "control": scenario_control,
}


def print_table(rows: list[Row]) -> None:
    width = 100
    print(f"{'scenario':<9}{'verdict':<9}figures")
    for row in rows:
        verdict = "FAIL" if row.failures else "ok"
        lines = [
            line
            for figure in row.figures
            for line in textwrap.wrap(figure, width - 18, subsequent_indent="  ")
        ]
        for i, line in enumerate(lines or [""]):
            print(f"{row.name if i == 0 else '':<9}{verdict if i == 0 else '':<9}{line}")
    for row in rows:
        for failure in row.failures:
            print(f"FAIL {row.name}: {failure}")
        for note in row.notes:
            print(f"note {row.name}: {note}")


class _Interrupted(BaseException):
    """SIGTERM or SIGHUP to the harness: unwind as Ctrl-C does, so the clean-up runs."""


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of chaos in all (default 120)")
    parser.add_argument(
        "--seed", type=int, default=None, help="the random seed (default: a fresh one, printed)"
    )
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios to run (default: all of them)")
    parser.add_argument(
        "--run-id", default=None, help="the OTREE_CHAOS marker (default: a fresh one, printed)"
    )
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in SCENARIOS]
    if unknown or not args.only:
        parser.error(f"--only: unknown scenario {', '.join(unknown)!r} (known: {', '.join(SCENARIOS)})")
    if args.run_id is not None and (not args.run_id or not args.run_id.isalnum()):
        parser.error("--run-id: letters and digits only")
    if args.duration <= 0:
        parser.error("--duration must be > 0")
    return args


def run_scenarios(args: argparse.Namespace, marks: Marks, root: Path) -> list[Row]:
    rng = random.Random(args.seed)
    total = sum(SHARES[name] for name in args.only)
    rows = []
    for name in args.only:
        ctx = Context(
            marks, root / name, random.Random(rng.randrange(2**32)), args.duration * SHARES[name] / total
        )
        ctx.dir.mkdir(mode=0o700)
        t0 = time.monotonic()
        try:
            row = SCENARIOS[name](ctx)
        except Exception as error:  # noqa: BLE001 - a harness failure fails its row, the others still run
            traceback.print_exc()
            row = Row(name, [], [f"the scenario itself failed: {type(error).__name__}: {error}"])
        finally:
            stray = marks.kill_all()  # a clean slate for the next scenario
        row.figures.append(f"took {time.monotonic() - t0:.0f} s")
        if stray:
            row.notes.append(f"{stray} processes of the run were still alive after the scenario (killed)")
        rows.append(row)
        print(f"{name}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    marks = Marks(args.run_id or uuid.uuid4().hex[:16])
    print(
        f"chaos run {marks.run_id}, seed {args.seed}, {args.duration:g} s over {', '.join(args.only)}",
        flush=True,
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # 500 clients at once, and followers
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    root = Path(tempfile.mkdtemp(prefix=f"otree-chaos-{marks.run_id}-"))
    runtime = os.environ.get("OTREE_RUNTIME_DIR")
    os.environ["OTREE_RUNTIME_DIR"] = str(root / "run")  # sockets in the run's own temp dir
    try:
        rows = run_scenarios(args, marks, root)
    except (KeyboardInterrupt, _Interrupted):
        print("chaos: interrupted; killing every process of the run", file=sys.stderr)
        return 130
    finally:
        marks.close()
        shutil.rmtree(root, ignore_errors=True)
        if runtime is None:
            os.environ.pop("OTREE_RUNTIME_DIR", None)
        else:
            os.environ["OTREE_RUNTIME_DIR"] = runtime
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print_table(rows)
    return 1 if any(row.failures for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
