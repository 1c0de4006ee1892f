"""The control plane: ``otree status`` on a large tree, and what the event log costs.

``python -m benchmarks.bench_control`` prints, each figure with its peer from the same run:

* status round trip against a real ``otree run`` of 10,000 idle children: connect,
  request, the tree's snapshot encoded, decoded and rendered as text by the
  client (median of 20), next to the same round trip on a 1-child tree (the
  socket and process floor), and the wall time of the whole ``otree status``
  command (a fresh interpreter: Python start-up and imports included);
* event-log throughput: events appended and written (encoded, rotated files) per
  second, next to the standard library's way (a ``logging.FileHandler`` with a
  ``json.dumps`` formatter) and the floor (``msgspec`` lines written in one go);
* restart cost with the event log on against off (same run, alternating fresh
  interpreters), with the otree logger quiet and with every event printed as
  ``otree run`` prints them: the log must not slow restarts by more than 10 %.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from otree._client import call
from otree._eventlog import EventLog
from otree._info import Event, Status
from otree._paths import control_socket
from otree._render import render_status

REPO = Path(__file__).resolve().parent.parent

TREE = """\
import trio
import otree


async def idle():
    await trio.sleep_forever()


tree = otree.supervisor(
    "big", children=[otree.task(f"agent{{i:05d}}", idle) for i in range({n})]
)
"""


def _events(n: int) -> list[Event]:
    """Events shaped like a crash loop's: exited (with an error), restarting, started, ready."""
    now = time.time()
    shapes = [
        (
            "child.exited",
            "error",
            {"detail": "RuntimeError: boom", "exception": "RuntimeError", "message": "boom"},
        ),
        ("child.restarting", "restart", {"delay": 0.0, "restarts_in_window": 3}),
        ("child.started", "", {}),
        ("child.ready", "", {}),
    ]
    return [
        Event(now + i * 1e-6, f"fleet/agents/agent{i % 1000:03d}", *shapes[i % 4][:2], dict(shapes[i % 4][2]))
        for i in range(n)
    ]


def status_round_trips(children: int, repeats: int) -> dict[str, float]:
    """Median seconds of a status round trip (and a whole ``otree status`` command) on a real tree."""
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        file = root / "tree.py"
        file.write_text(TREE.format(n=children))
        state = root / "state"
        env = dict(os.environ, OTREE_STATE_DIR=str(state), OTREE_RUNTIME_DIR=str(root / "run"))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        os.environ["OTREE_RUNTIME_DIR"] = env["OTREE_RUNTIME_DIR"]
        runner = subprocess.Popen(
            [sys.executable, "-m", "otree", "run", str(file)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert runner.stderr is not None
            for line in runner.stderr:  # the socket is up once this event is printed
                if "control.listening" in line:
                    break
            # keep reading: the run prints a line per child as it stops, more than a pipe holds
            drain = threading.Thread(target=runner.stderr.read, daemon=True)
            drain.start()
            sock = control_socket(state)
            round_trips = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                status = msgspec.convert(call(sock, state, "status", path=""), Status)
                text = render_status(status)
                round_trips.append(time.perf_counter() - t0)
            assert text.count("\n") == children
            commands = []
            for _ in range(max(3, repeats // 4)):
                t0 = time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "otree", "status"], env=env, check=True, capture_output=True
                )
                commands.append(time.perf_counter() - t0)
        finally:
            runner.terminate()
            runner.wait(timeout=60)
            runner.stderr.close()  # type: ignore[union-attr]
    return {"round_trip_s": statistics.median(round_trips), "command_s": statistics.median(commands)}


async def _eventlog_rate(path: Path, events: list[Event]) -> float:
    log = EventLog(path)
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.serve)
        for start in range(0, len(events), 1000):  # a busy tree: bursts between checkpoints
            for event in events[start : start + 1000]:
                log.append(event)
            await trio.lowlevel.checkpoint()
        log.finish()
    log.close()
    return len(events) / (time.perf_counter() - t0)


def eventlog_throughput(n: int) -> dict[str, float]:
    events = _events(n)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        otree_rate = trio.run(_eventlog_rate, root / "events.jsonl", events)

        handler = logging.FileHandler(root / "stdlib.jsonl")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.Logger("bench")
        logger.addHandler(handler)
        t0 = time.perf_counter()
        for event in events:
            logger.info(
                "%s",
                json.dumps(
                    {
                        "time": event.time,
                        "path": event.path,
                        "kind": event.kind,
                        "reason": event.reason,
                        "details": event.details,
                    }
                ),
            )
        handler.close()
        stdlib_rate = n / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        (root / "floor.jsonl").write_bytes(msgspec.json.Encoder().encode_lines(events))
        floor_rate = n / (time.perf_counter() - t0)
    return {"otree": otree_rate, "stdlib": stdlib_rate, "floor": floor_rate}


def restart_cost(scenario: str, n: int, repeats: int) -> dict[str, float]:
    """Median µs per crash→running cycle with the event log off and on (alternating runs)."""
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(repeats):
        for mode in ("off", "on"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_core", scenario, str(n), f"log-{mode}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[mode].append(json.loads(out)["us_per_restart"])
    return {mode: statistics.median(values) for mode, values in runs.items()}


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    big = status_round_trips(10_000, 20)
    small = status_round_trips(1, 20)
    ratio = big["round_trip_s"] / small["round_trip_s"]
    print(
        f"status round trip, 10,000 children: {big['round_trip_s'] * 1e3:.1f} ms "
        f"(1 child: {small['round_trip_s'] * 1e3:.2f} ms, ratio {ratio:.0f}); whole `otree status` "
        f"command: {big['command_s'] * 1e3:.0f} ms (1 child: {small['command_s'] * 1e3:.0f} ms)"
    )
    rates: dict[str, Any] = eventlog_throughput(200_000)
    print(
        f"event log, 200,000 events: otree {rates['otree']:,.0f}/s, "
        f"stdlib logging+json {rates['stdlib']:,.0f}/s (ratio {rates['otree'] / rates['stdlib']:.2f}), "
        f"floor (msgspec lines, one write) {rates['floor']:,.0f}/s"
    )
    for scenario, logging_as in (
        ("restart-otree-quiet", "quiet logger"),
        ("restart-otree-run", "every event on stderr, as otree run"),
    ):
        cost = restart_cost(scenario, 20_000, repeats)
        print(
            f"restart (20,000 crash->running cycles, {logging_as}, median of {repeats}): event log "
            f"off {cost['off']:.1f} us, on {cost['on']:.1f} us (ratio {cost['on'] / cost['off']:.3f})"
        )


if __name__ == "__main__":
    main()
