"""The ready trees of ``supervisors/`` (docs/recipes.md): each behaviour of its system's row in the
issue's table, driven through ``otree run`` and the CLI on short times (``OTREE_DEMO_SPEED``)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from otree._client import call
from otree._paths import control_socket

from .helpers import pids_where, proc_stat, state_and_parent
from .otree_subprocess import REPO, OtreeProcess, is_text_event, run_otree, subprocess_env

SUPERVISORS = REPO / "supervisors"
T = TypeVar("T")
SPEED = "100"
DEADLINE = 15.0


@pytest.fixture
def demo_env(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set the environment a ready tree reads: its speed, and any overrides given."""

    def setenv(**overrides: str) -> None:
        monkeypatch.setenv("OTREE_DEMO_SPEED", SPEED)
        for name, value in overrides.items():
            monkeypatch.setenv(name, value)

    return setenv


class Tree:
    """A ready tree under ``otree run`` in ``cwd``, and the CLI aimed at it."""

    def __init__(self, name: str, root: str, cwd: Path) -> None:
        self.cwd = cwd
        self.process = OtreeProcess(["run", str(SUPERVISORS / f"{name}.py")], cwd)
        self.process.wait_for(is_text_event(root, "supervisor.started"))

    def cli(self, *args: str) -> tuple[int, str, str]:
        done = run_otree(list(args), self.cwd)
        return done.returncode, done.stdout, done.stderr

    def json(self, *args: str) -> Any:
        code, out, err = self.cli(*args, "--json")
        assert code == 0, (args, out, err)
        return json.loads(out)

    def submit(self, argv: list[str], *options: str, cost: float = 0.0) -> str:
        payload = json.dumps({"argv": argv, "cost": cost})
        reply = self.json("submit", "jobs", "run", payload, *options)
        return str(reply["id"])

    def running(self, count: int, pool: str = "jobs") -> list[dict[str, Any]]:
        """The pool's running jobs, once there are ``count`` of them."""

        def probe() -> list[dict[str, Any]] | None:
            jobs: list[dict[str, Any]] = self.json("jobs", pool)["running"]
            return jobs if len(jobs) == count else None

        return wait(probe, f"{count} running jobs in {pool}")

    def info(self, path: str) -> Any:
        """The status ``info`` of the node at ``path`` (None: not in the tree)."""
        nodes = [self.json("status")["root"]]
        while nodes:
            node = nodes.pop()
            if node["info"]["path"] == path:
                return node["info"]
            nodes.extend(node["children"])
        return None

    def events(self) -> list[dict[str, Any]]:
        code, out, err = self.cli("events", "--json")
        assert code == 0, err
        return [json.loads(line) for line in out.splitlines()]

    def wait_event(self, path: str, kind: str, reason: str | None = None, after: int = 0) -> dict[str, Any]:
        """The first event of ``kind`` at ``path`` (and ``reason``) past the ``after``-th event."""
        return wait(
            lambda: next(
                (
                    e
                    for e in self.events()[after:]
                    if e["path"] == path and e["kind"] == kind and reason in (None, e["reason"])
                ),
                None,
            ),
            f"{kind} at {path}",
        )

    def stop(self) -> int:
        self.process.proc.send_signal(signal.SIGTERM)
        return self.process.finish(timeout=DEADLINE)


def wait(probe: Callable[[], T | None], what: str, timeout: float = DEADLINE) -> T:
    """Poll ``probe`` until it gives something (an OS process is not on trio's clock)."""
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.02)
    return found


@pytest.fixture
def run_tree(tmp_path: Path) -> Iterator[Callable[[str, str], Tree]]:
    trees: list[Tree] = []

    def start(name: str, root: str) -> Tree:
        trees.append(Tree(name, root, tmp_path))
        return trees[-1]

    yield start
    for tree in trees:
        tree.process.stop()


def group_of(pgid: int) -> set[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    return set(pids_where(lambda pid: (fields := proc_stat(pid))[0] != "Z" and int(fields[2]) == pgid))


def children_of(parent: int) -> list[int]:
    """``parent``'s children, zombies included (a zombie is a child not yet reaped)."""
    return pids_where(lambda pid: state_and_parent(pid)[1] == parent)


def command_line(pid: int) -> str:
    """``pid``'s command line, words joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def ignores_sigterm(pid: int) -> bool:
    """Whether ``pid`` has set SIGTERM to be ignored yet (its SigIgn mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)


SLEEP = ["sleep", "30"]
# A job that leaves a grandchild in a session of its own (out of the job's group) and exits:
# Popen returns once the child has exec'd, so the escape is done before the job ends.
ESCAPE = "import subprocess as s; s.Popen(['sleep', '2.731'], start_new_session=True, stdout=s.DEVNULL)"


# --- daemon job supervisor ---------------------------------------------------------------------


def test_job_daemon_cap_queue_priority_and_group_kill(demo_env: Callable[..., None], run_tree: Any) -> None:
    """Cap 4; 20 may wait and the 21st is refused; the higher priority starts first; a cancelled
    job's whole process group is killed; a stop drops (and reports) every queued job."""
    demo_env()
    tree = run_tree("job_daemon", "daemon")
    family = tree.submit(["sh", "-c", "sleep 300 & sleep 300"])
    blockers = [tree.submit(SLEEP) for _ in range(3)]
    running = tree.running(4)
    low = [tree.submit(["true"]) for _ in range(19)]
    urgent = tree.submit(SLEEP, "--priority", "5")
    listing = tree.json("jobs", "jobs")
    assert len(listing["running"]) == 4 and len(listing["queued"]) == 20
    code, _, err = tree.cli("submit", "jobs", "run", json.dumps({"argv": ["true"]}))
    assert code == 4 and err.count("\n") == 1 and "full" in err, err

    leader = next(job["pid"] for job in running if job["id"] == family)
    wait(lambda: True if len(group_of(leader)) == 3 else None, "sh and its two sleeps")
    assert tree.cli("cancel", "jobs", family)[0] == 0
    wait(lambda: True if not group_of(leader) else None, "the whole group gone")
    tree.wait_event(f"daemon/jobs/{urgent}", "job.started")  # its slot went to the urgent job

    assert tree.stop() == 0
    events = tree.events()
    assert not [e for e in events if e["kind"] == "job.started" and e["path"].rsplit("/", 1)[1] in low]
    dropped = {e["path"].rsplit("/", 1)[1]: e["reason"] for e in events if e["kind"] == "job.dropped"}
    stopped = low + blockers + [urgent]
    assert {job: dropped.get(job) for job in stopped} == dict.fromkeys(stopped, "pool_stopped")


def test_job_daemon_budget_and_breaker(demo_env: Callable[..., None], run_tree: Any) -> None:
    """The daily budget warns at 90 % and refuses a job once spent + estimate would reach the limit;
    five failures open the breaker for 120 s (1.2 s here), and submissions are refused meanwhile."""
    demo_env(OTREE_DAILY_BUDGET="1")
    tree = run_tree("job_daemon", "daemon")

    def run(argv: list[str], cost: float) -> tuple[int, str, str]:
        payload = json.dumps({"argv": argv, "cost": cost})
        return tree.cli("submit", "jobs", "run", payload, "--cost", str(cost), "--wait")

    assert run(["true"], 0.5)[0] == 0
    assert not [e for e in tree.events() if e["kind"] == "budget.warning"]
    assert run(["true"], 0.45)[0] == 0  # $0.95 of $1: past 90 %
    tree.wait_event("daemon/jobs", "budget.warning")
    code, _, err = run(["true"], 0.05)  # 0.95 + 0.05 reaches the limit: refused
    assert code == 4 and err.count("\n") == 1 and "budget" in err, err
    assert run(["true"], 0.04)[0] == 0  # 0.99 stays below it

    for _ in range(5):
        assert run(["false"], 0)[0] == 6
    opened = tree.wait_event("daemon/jobs", "circuit.opened")
    code, _, err = run(["true"], 0)
    assert code == 4 and err.count("\n") == 1 and "circuit" in err, err
    assert "circuit open" in tree.cli("status")[1]
    wait(lambda: True if run(["true"], 0)[0] == 0 else None, "a submission taken after the cooldown")
    tree.wait_event("daemon/jobs", "circuit.closed")  # the event log is written behind the reply
    circuit = [e for e in tree.events() if e["kind"].startswith("circuit.")]
    assert [e["kind"] for e in circuit] == ["circuit.opened", "circuit.half_open", "circuit.closed"]
    assert circuit[1]["time"] - opened["time"] >= 1.2  # 120 s at a hundredfold speed; the trial closed it
    assert tree.stop() == 0


def test_job_daemon_loop_gives_up_orphans_reaped_and_stop_grace(
    demo_env: Callable[..., None], run_tree: Any
) -> None:
    """``loops/poller`` dying three times within 5 min (3 s here) fails ``loops`` for good while jobs
    go on; a grandchild a job leaves behind is reaped by otree; a stop gives a job that ignores
    SIGTERM its 30 s grace (0.3 s here), then kills it."""
    demo_env()
    tree = run_tree("job_daemon", "daemon")
    for death in range(3):
        old = tree.info("daemon/loops/poller")["pid"]
        assert tree.cli("signal", "loops/poller", "KILL")[0] == 0
        if death < 2:
            wait(
                lambda: True if tree.info("daemon/loops/poller")["pid"] not in (None, old) else None,  # noqa: B023
                "a poller",
            )
    tree.wait_event("daemon/loops", "supervisor.intensity_exceeded")
    wait(lambda: True if tree.info("daemon/loops")["state"] == "stopped" else None, "loops down for good")
    assert tree.info("daemon")["state"] == "running"
    assert tree.info("daemon/jobs")["state"] == "running"

    otree_pid = tree.process.proc.pid
    assert (
        tree.cli(
            "submit",
            "jobs",
            "run",
            json.dumps({"argv": ["python3", "-c", ESCAPE]}),
            "--wait",
        )[0]
        == 0
    )
    orphan = wait(
        lambda: next((p for p in children_of(otree_pid) if command_line(p) == "sleep 2.731"), None),
        "the orphan under otree",
    )
    wait(lambda: True if orphan not in children_of(otree_pid) else None, "the orphan reaped")

    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
    job = tree.submit(["python3", "-c", stubborn])
    leader = tree.running(1)[0]["pid"]
    wait(lambda: True if ignores_sigterm(leader) else None, "the stubborn job deaf to SIGTERM")
    began = time.monotonic()
    assert tree.stop() == 0
    assert 0.3 <= time.monotonic() - began < 5
    assert not group_of(leader)
    stopped = [e for e in tree.events() if e["path"] == f"daemon/jobs/{job}"][-1]
    assert stopped["kind"] == "job.dropped", stopped


# --- turn runner -------------------------------------------------------------------------------


def turn(agent: str, **options: Any) -> str:
    return json.dumps({"agent": agent, **options})


def test_turn_runner_one_turn_per_agent_stdin_pid_logs_and_stall(
    demo_env: Callable[..., None], run_tree: Any
) -> None:
    """One turn per agent at a time, agents in parallel; the turn on stdin then EOF (the reply
    comes back); the running turn's pid; its own log; a stall watchdog of 600 s (3 s here) that
    any output resets: a turn that talks for longer lives, a silent one is stopped."""
    demo_env(OTREE_DEMO_SPEED="200")
    tree = run_tree("turn_runner", "runner")

    def submit(agent: str, *options: str, **payload: Any) -> str:
        return str(
            tree.json("submit", "turns", "turn", turn(agent, **payload), "--lane", agent, *options)["id"]
        )

    chatty = submit("ada", steps=10, pause=0.4)  # 4 s of turn, never 3 s silent
    ada_next = submit("ada", steps=1, pause=0)
    bob = submit("bob", steps=1, pause=4)  # silent for 4 s after its first line
    running = tree.running(2, pool="turns")
    assert {job["id"]: job["lane"] for job in running} == {chatty: "ada", bob: "bob"}
    assert [job["id"] for job in tree.json("jobs", "turns")["queued"]] == [ada_next]
    for job in running:
        assert Path(f"/proc/{job['pid']}").exists()

    tree.wait_event(f"runner/turns/{bob}", "job.dead_lettered")
    assert "stalled" in tree.json("job", "turns", bob)["error"]
    code, out, err = tree.cli(
        "submit", "turns", "turn", turn("cy", steps=1, pause=0), "--lane", "cy", "--wait"
    )
    assert code == 0 and json.loads(out) == {"agent": "cy", "reply": "done"}, (out, err)
    tree.wait_event(f"runner/turns/{ada_next}", "job.finished")
    ada = [
        e
        for e in tree.events()
        if e["kind"] == "job.started" and e["path"].endswith(("/" + chatty, "/" + ada_next))
    ]
    finished = tree.wait_event(f"runner/turns/{chatty}", "job.finished")
    assert ada[1]["time"] >= finished["time"]  # ada's next turn began only after the chatty one ended
    code, out, _ = tree.cli("logs", f"turns/{chatty}", "--stderr")
    assert code == 0 and "ada: step 9" in out
    assert tree.stop() == 0


def test_turn_runner_abort_worker_death_and_grace(demo_env: Callable[..., None], run_tree: Any) -> None:
    """An operator aborts one turn (its lane goes on); a worker killed under a submitter waiting
    for it tells that submitter how it died; a stop is SIGTERM then SIGKILL 2 s later."""
    demo_env()
    tree = run_tree("turn_runner", "runner")
    aborted = str(tree.json("submit", "turns", "turn", turn("ada", steps=100), "--lane", "ada")["id"])
    following = str(
        tree.json("submit", "turns", "turn", turn("ada", steps=1, pause=0), "--lane", "ada")["id"]
    )
    tree.running(1, pool="turns")
    assert tree.cli("cancel", "turns", aborted)[0] == 0
    tree.wait_event(f"runner/turns/{aborted}", "job.cancelled")
    tree.wait_event(f"runner/turns/{following}", "job.finished")

    waiter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "otree",
            "submit",
            "turns",
            "turn",
            turn("bob", steps=100),
            "--lane",
            "bob",
            "--wait",
        ],
        cwd=tree.cwd,
        env=subprocess_env(tree.cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        victim = tree.running(1, pool="turns")[0]
        assert tree.cli("signal", "turns", "KILL", "--job", victim["id"])[0] == 0
        out, err = waiter.communicate(timeout=DEADLINE)
    finally:
        waiter.kill()
        waiter.wait()
    assert waiter.returncode == 6 and "SIGKILL" in err and err.count("\n") == 1, (out, err)

    stubborn = turn("cy", steps=1, pause=60, ignore_sigterm=True)
    tree.json("submit", "turns", "turn", stubborn, "--lane", "cy")
    leader = tree.running(1, pool="turns")[0]["pid"]
    wait(lambda: True if ignores_sigterm(leader) else None, "the stubborn turn deaf to SIGTERM")
    began = time.monotonic()
    assert tree.stop() == 0
    assert 2.0 <= time.monotonic() - began < 6.0
    assert not group_of(leader)


# --- cadence consumer --------------------------------------------------------------------------


def test_cadence_failures_hold_their_cadence_only(demo_env: Callable[..., None], run_tree: Any) -> None:
    """Two attempts (the retry at once: the schedule's first delay); three failures open the
    cadence's own breaker, its next tick waits and keeps its attempt while the other cadence runs;
    the circuit is visible; a failure keeps a 4 KiB stderr tail; each run has its own log; one
    sub-session at a time, and at most one start per 10 s tick (0.1 s here)."""
    demo_env(OTREE_CADENCE_FAIL="inbox", OTREE_CADENCE_WORK="0.3")
    tree = run_tree("cadence", "cadence")
    opened = tree.wait_event("cadence/sessions", "circuit.opened")
    assert opened["details"]["lane"] == "inbox"
    code, out, _ = tree.cli("lane", "sessions", "inbox")
    assert code == 0 and "circuit open" in out and "queued 1" in out, out
    held = tree.json("lane", "sessions", "inbox")
    assert held["circuit"] == "open" and held["held"].startswith("circuit open")
    code, _, err = tree.cli("lane", "sessions", "nowhere")
    assert code == 4 and err.count("\n") == 1 and "no lane 'nowhere'" in err, err

    events = tree.events()
    ticks: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event["kind"].startswith("job."):
            ticks.setdefault(event["path"].rsplit("/", 1)[1], []).append(event)
    inbox = [job for job, seen in ticks.items() if seen[0]["details"].get("lane") == "inbox"]
    first, second = inbox[0], inbox[1]
    assert [e["kind"] for e in ticks[first]] == [
        "job.queued",
        "job.started",
        "job.retried",
        "job.started",
        "job.dead_lettered",
    ]
    waiting = tree.json("job", "sessions", second)
    assert waiting["attempts"] == 1 and waiting["state"] in ("queued", "waiting"), waiting  # kept its attempt
    letter = tree.json("dead-letters", "sessions")[0]
    tail = letter["error"].split(": ", 1)[1]
    assert len(tail.encode()) <= 4096 and tail.rstrip().endswith("inbox: the session failed"), letter["error"]

    digest = tree.wait_event(
        "cadence/sessions/" + next(j for j, s in ticks.items() if s[0]["details"].get("lane") == "digest"),
        "job.finished",
    )
    runs = sorted(
        (start["time"], end["time"])
        for seen in ticks.values()
        for start, end in zip(
            [e for e in seen if e["kind"] == "job.started"],
            [e for e in seen if e["kind"] in ("job.retried", "job.dead_lettered", "job.finished")],
            strict=False,  # a run still going has no end yet
        )
    )
    for (began, ended), (next_began, _) in itertools.pairwise(runs):
        assert ended <= next_began and next_began - began >= 0.09  # one at a time, one start per tick
    code, out, _ = tree.cli("logs", f"sessions/{digest['path'].rsplit('/', 1)[1]}", "--stderr")
    assert code == 0 and "digest: step 399" in out
    assert tree.stop() == 0


def test_cadence_max_runtime(demo_env: Callable[..., None], run_tree: Any) -> None:
    """A sub-session may run 30 min (1.8 s here): past it, it is stopped and the attempt fails."""
    demo_env(OTREE_DEMO_SPEED="1000", OTREE_CADENCE_WORK="30")
    tree = run_tree("cadence", "cadence")
    retried = tree.wait_event("cadence/sessions/1", "job.retried")
    started = tree.events()[[e["kind"] for e in tree.events()].index("job.started")]
    assert "max_runtime" in json.dumps(retried["details"])
    assert 1.8 <= retried["time"] - started["time"] < 5
    assert tree.stop() == 0


def test_cadence_recovers_a_claimed_tick_after_a_crash(demo_env: Callable[..., None], run_tree: Any) -> None:
    """otree killed under a running sub-session: the sub-session goes with it, and the tick it
    claimed runs again when otree is back (the pool is durable)."""
    demo_env(OTREE_CADENCE_WORK="30")
    tree = run_tree("cadence", "cadence")
    claimed = tree.running(1, pool="sessions")[0]
    tree.process.proc.kill()
    tree.process.finish()
    wait(lambda: True if not group_of(claimed["pid"]) else None, "the sub-session gone with otree")
    again = run_tree("cadence", "cadence")
    recovered = again.wait_event(f"cadence/sessions/{claimed['id']}", "job.queued", "recovered")
    again.wait_event(
        f"cadence/sessions/{claimed['id']}", "job.started", after=again.events().index(recovered)
    )
    assert again.stop() == 0


# --- outbox ------------------------------------------------------------------------------------


@pytest.fixture
def outbox_env(demo_env: Callable[..., None], tmp_path: Path) -> Callable[..., Path]:
    """The outbox's socket in a short private directory (a Unix socket path fits 108 bytes)."""
    where = Path(tempfile.mkdtemp(prefix="ob-", dir=os.environ["OTREE_RUNTIME_DIR"]))

    def setenv(**overrides: str) -> Path:
        notices = tmp_path / "notices"
        demo_env(OTREE_OUTBOX_SOCKET=str(where / "gw.sock"), OTREE_OUTBOX_NOTICES=str(notices), **overrides)
        return notices

    yield setenv
    shutil.rmtree(where, ignore_errors=True)


def message(to: str, text: str) -> str:
    return json.dumps({"to": to, "text": text})


def sent(tree: Tree) -> list[dict[str, Any]]:
    """What the provider sent, in order (its log)."""
    code, out, err = tree.cli("logs", "gateway/provider", "-n", "1000")
    assert code == 0, err
    return [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("sent ")]


def test_outbox_fifo_per_destination_coalescing_and_durability(
    outbox_env: Callable[..., Path], run_tree: Any
) -> None:
    """With the provider offline, messages wait: a failed one holds its destination only (strict
    FIFO), a later submission with a waiting message's key replaces it in place; otree killed and
    started again still has them, and once the provider is back they go out in order."""
    outbox_env(OTREE_DEMO_SPEED="10")  # retries 0.1 s ... 6 s apart: 12 attempts take over 18 s
    tree = run_tree("outbox", "outbox")
    assert tree.cli("stop", "gateway")[0] == 0

    def submit(to: str, text: str, *options: str) -> str:
        return str(tree.json("submit", "messages", "send", message(to, text), "--lane", to, *options)["id"])

    ada = [submit("ada", f"ada-{n}") for n in range(3)]
    bob = submit("bob", "bob-first")
    retried = tree.wait_event(f"outbox/messages/{ada[0]}", "job.retried")
    assert retried["details"]["lane"] == "ada"
    tree.wait_event(f"outbox/messages/{bob}", "job.retried")  # bob-first now holds bob's lane
    old = submit("bob", "bob-old", "--key", "bob-news")  # queued behind it
    new = submit("bob", "bob-new", "--key", "bob-news")
    replaced = tree.wait_event(f"outbox/messages/{old}", "job.dropped")
    assert replaced["reason"] == "replaced" and replaced["details"]["replaced_by"] == new
    starts = [e["path"].rsplit("/", 1)[1] for e in tree.events() if e["kind"] == "job.started"]
    assert ada[1] not in starts and new not in starts  # each held behind its lane's failing head

    tree.process.proc.kill()  # kill -9: the durable queue keeps every message
    tree.process.finish()
    again = run_tree("outbox", "outbox")
    assert again.cli("start", "gateway")[0] == 0  # it came back with the tree, or comes back now
    wait(lambda: True if len(sent(again)) == 5 else None, "five messages sent", timeout=30)
    out = sent(again)
    assert [m["text"] for m in out if m["to"] == "ada"] == ["ada-0", "ada-1", "ada-2"]
    assert [m["text"] for m in out if m["to"] == "bob"] == ["bob-first", "bob-new"]
    assert again.json("dead-letters", "messages") == []
    assert again.stop() == 0


def test_outbox_poison_after_12_attempts(outbox_env: Callable[..., Path], run_tree: Any) -> None:
    """A message the provider refuses is tried 12 times, 1 s ... 60 s apart with half jitter, then
    kept as a dead letter."""
    outbox_env()
    tree = run_tree("outbox", "outbox")
    poison = str(tree.json("submit", "messages", "send", json.dumps({"to": "cy"}), "--lane", "cy")["id"])
    tree.wait_event(f"outbox/messages/{poison}", "job.dead_lettered")
    runs = [
        e for e in tree.events() if e["path"] == f"outbox/messages/{poison}" and e["kind"] != "job.queued"
    ]
    assert [e["kind"] for e in runs].count("job.started") == 12
    for n, retry in enumerate(e for e in runs if e["kind"] == "job.retried"):
        base = min(60.0, 2.0**n) / 100  # at a hundredfold speed
        assert base / 2 <= retry["details"]["delay"] <= base, (n, retry)
    [letter] = tree.json("dead-letters", "messages")
    assert letter["id"] == poison and letter["attempts"] == 12 and "refused: no text" in letter["error"]

    assert tree.stop() == 0


def test_outbox_drops_the_oldest_beyond_5000(outbox_env: Callable[..., Path], run_tree: Any) -> None:
    """At most 5000 messages wait: the 5001st waiting one drops the oldest (``queue_full``)."""
    outbox_env(OTREE_DEMO_SPEED="1")  # retries 1 s, 2 s ... apart: no message becomes poison meanwhile
    tree = run_tree("outbox", "outbox")
    assert tree.cli("stop", "gateway")[0] == 0
    state = tree.cwd / "state"
    sock = control_socket(state)
    ids = [
        call(
            sock,
            state,
            "submit",
            pool="messages",
            kind="send",
            payload={"to": "dee", "text": str(n)},
            lane="dee",
        )["id"]
        for n in range(5002)
    ]
    dropped = wait(lambda: [e for e in tree.events() if e["kind"] == "job.dropped"] or None, "a drop")
    # the first message fails and waits for its retry (it counts) but for the moments it runs
    # (it does not): 5002 submissions drop one or two of the oldest, never a newer one
    assert {e["reason"] for e in dropped} == {"queue_full"} and 1 <= len(dropped) <= 2
    assert {e["path"].rsplit("/", 1)[1] for e in dropped} <= set(ids[:2])
    listing = tree.json("jobs", "messages")
    assert 4999 <= len(listing["queued"]) + len(listing["retrying"]) <= 5000
    assert tree.stop() == 0


def test_outbox_provider_restart_delay_give_up_hook_and_log_level(
    outbox_env: Callable[..., Path], run_tree: Any
) -> None:
    """The provider restarts after 0.5 s, 1 s, 1.5 s ... (0.5 s per recent exit, at most 10 s), and
    after six deaths in a minute the gateway is left offline; each exit is told to the hook, whose
    failure is an event; the log level is read and set at run time."""
    notices = outbox_env(OTREE_DEMO_SPEED="10")
    tree = run_tree("outbox", "outbox")
    for death in range(6):
        pid = wait(lambda: tree.info("outbox/gateway/provider")["pid"], "a provider")
        assert tree.cli("signal", "gateway/provider", "KILL")[0] == 0
        if death < 5:
            wait(
                lambda: True if tree.info("outbox/gateway/provider")["pid"] not in (None, pid) else None,  # noqa: B023
                "restart",
            )
    tree.wait_event("outbox/gateway", "supervisor.intensity_exceeded")
    wait(lambda: True if tree.info("outbox/gateway")["state"] == "stopped" else None, "the gateway offline")
    delays = [
        e["details"]["delay"]
        for e in tree.events()
        if e["path"] == "outbox/gateway/provider" and e["kind"] == "child.restarting"
    ]
    assert delays == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25])  # 0.5 s * n at tenfold speed
    wait(
        lambda: True if len(notices.read_text().splitlines()) == 6 else None, "six notices"
    )  # hooks run after

    notices.unlink()
    notices.mkdir()  # the hook cannot write its notice now
    assert tree.cli("start", "gateway")[0] == 0
    pid = wait(lambda: tree.info("outbox/gateway/provider")["pid"], "a provider")
    assert tree.cli("signal", "gateway/provider", "KILL")[0] == 0
    failed = tree.wait_event("outbox/gateway/provider", "child.on_exit_failed")
    assert "Is a directory" in json.dumps(failed["details"])

    assert tree.cli("log-level")[1] == "log level INFO\n"
    assert tree.cli("log-level", "warning")[1] == "log level WARNING\n"
    assert tree.cli("log-level")[1] == "log level WARNING\n"
    assert tree.stop() == 0


# --- peer lifecycle ----------------------------------------------------------------------------


@pytest.fixture
def peers_env(demo_env: Callable[..., None]) -> Iterator[Callable[..., None]]:
    """The sessions' sockets in a short private directory."""
    where = Path(tempfile.mkdtemp(prefix="pe-", dir=os.environ["OTREE_RUNTIME_DIR"]))

    def setenv(**overrides: str) -> None:
        demo_env(OTREE_PEERS_DIR=str(where), **overrides)

    yield setenv
    shutil.rmtree(where, ignore_errors=True)


def tell(tree: Tree, to: str, lane: str | None = None, **fields: Any) -> tuple[int, str, str]:
    """Deliver a message to a peer and wait for the outcome."""
    return tree.cli(
        "submit", "inbox", "message", json.dumps({"to": to, **fields}), "--lane", lane or to, "--wait"
    )


def session_log(tree: Tree, peer: str) -> list[str]:
    code, out, err = tree.cli("logs", f"peers/{peer}/session", "-n", "1000")
    assert code == 0, err
    return out.splitlines()


def decisions(tree: Tree, path: str) -> list[tuple[str, str]]:
    return [
        (e["kind"], e["reason"]) for e in tree.events() if e["path"] == path and e["kind"] != "child.ready"
    ]


def test_peers_lazy_wake_idle_park_resume_and_stopped_by_hand(
    peers_env: Callable[..., None], run_tree: Any
) -> None:
    """The first message starts a peer; an hour of silence (7.2 s here) parks it; the next message
    wakes it once, however many arrive together, and it resumes; a peer an operator stopped stays
    stopped (the message fails, the refused wake is an event) until the operator starts it."""
    peers_env(OTREE_DEMO_SPEED="500")
    tree = run_tree("peers", "lifecycle")
    assert tree.info("lifecycle/peers/ada/session")["state"] == "stopped"  # lazy: not started
    assert tell(tree, "ada", text="hi")[0] == 0
    tree.wait_event("lifecycle/peers/ada/session", "child.parked")
    together = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "otree",
                "submit",
                "inbox",
                "message",
                json.dumps({"to": "ada", "text": lane}),
                "--lane",
                lane,
                "--wait",
            ],
            cwd=tree.cwd,
            env=subprocess_env(tree.cwd),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for lane in ("one", "two")
    ]
    assert [waiter.wait(timeout=DEADLINE) for waiter in together] == [0, 0]
    log = session_log(tree, "ada")
    assert log[0] == "fresh first run" and log[2] == "resume shutdown:idle:SIGTERM", log

    assert tree.cli("stop", "peers/ada/session")[0] == 0
    code, _, err = tell(tree, "ada", text="are you there")
    assert code == 6 and "stopped by an operator" in err, err
    assert tree.cli("start", "peers/ada/session")[0] == 0
    assert tell(tree, "ada", text="back")[0] == 0
    expected = [
        ("child.woken", "not_started"),
        ("child.started", ""),
        ("child.stopped", "shutdown"),
        ("child.parked", "idle"),
        ("child.woken", "parked"),  # once for the two messages
        ("child.started", ""),
        ("child.stopped", "shutdown"),  # by the operator
        ("child.wake_refused", "held"),
        ("child.woken", "held"),  # the operator's start
        ("child.started", ""),
    ]
    # the event log is written behind the replies: wait until it has them all
    wait(lambda: True if decisions(tree, "lifecycle/peers/ada/session") == expected else None, "decisions")
    assert tree.stop() == 0


def test_peers_crash_loop_guard_survives_a_restart_of_otree(
    peers_env: Callable[..., None], run_tree: Any
) -> None:
    """A session that crashes restarts fresh; three deaths in 300 s (15 s here) and the peer gives
    up, the other peer untouched; after kill -9 and a new otree, one more death is enough."""
    peers_env(OTREE_DEMO_SPEED="20")
    tree = run_tree("peers", "lifecycle")
    assert tell(tree, "grace", text="hi")[0] == 0
    for _ in range(3):
        assert tell(tree, "ada", crash=True)[0] == 6
    tree.wait_event("lifecycle/peers/ada", "supervisor.intensity_exceeded")
    wait(lambda: True if tree.info("lifecycle/peers/ada")["state"] == "stopped" else None, "ada given up")
    assert tree.info("lifecycle/peers/grace/session")["state"] == "running"
    log = session_log(tree, "ada")
    assert log[0] == "fresh first run" and log[2].startswith("fresh error:"), log

    tree.process.proc.kill()
    tree.process.finish()
    again = run_tree("peers", "lifecycle")
    before = len(again.events())
    assert tell(again, "ada", crash=True)[0] == 6  # the wake starts it; one death is the third restart
    again.wait_event("lifecycle/peers/ada", "supervisor.intensity_exceeded", after=before)
    assert again.stop() == 0


def test_peers_boot_deadline_and_max_age(peers_env: Callable[..., None], run_tree: Any) -> None:
    """A session not ready 240 s (2.4 s here) after its start fails to start and the message fails;
    a session four hours old (1.5 s here) is replaced by a fresh one."""
    peers_env(OTREE_DEMO_SPEED="100", OTREE_PEERS_MAX_AGE="150")
    tree = run_tree("peers", "lifecycle")
    assert tell(tree, "ada", text="hi")[0] == 0
    aged = tree.wait_event("lifecycle/peers/ada/session", "child.exited")
    assert aged["reason"] == "error" and "max_runtime" in json.dumps(aged["details"])
    wait(lambda: True if len(session_log(tree, "ada")) >= 3 else None, "a fresh session")
    assert session_log(tree, "ada")[2].startswith("fresh error:max_runtime")
    assert tree.stop() == 0

    peers_env(OTREE_DEMO_SPEED="100", OTREE_PEERS_MAX_AGE="14400", OTREE_PEERS_BOOT="5")
    slow = run_tree("peers", "lifecycle")
    began = time.monotonic()
    code, _, err = tell(slow, "grace", text="hi")
    assert (code == 6 and "start_timeout" in err) or "ready" in err, err
    assert 2.4 <= time.monotonic() - began < 5
    assert slow.info("lifecycle/peers/grace/session")["state"] == "stopped"
    assert slow.stop() == 0
