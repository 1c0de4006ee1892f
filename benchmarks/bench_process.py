"""Process supervision: otree against supervisord and circus, each run as a daemon.

``python -m benchmarks.bench_process [TOOL ...]`` installs the peers (``supervisor``,
``circus``) from PyPI into a venv under the system temp dir (reused across runs),
then measures, in one run:

* restarts per second of a child that exits 1 at once (``sh -c``, and a Python
  one), each start counted by the child itself appending to a file, against the
  no-supervisor floor (a loop of ``subprocess.run``); for otree also with a 500 MB
  heap in the supervisor (the tree file holds it), since a spawn must not cost more
  when the supervisor is big;
* the CPU time of the daemon and its own helpers (its children that are not the
  supervised programs: otree's spawn helper) while it supervises 50 idle ``sleep``
  children for 20 s;
  (circus polls: the restart test uses ``check_delay=0.001``, its fastest stable
  setting; the other tests use its default of 5 s; supervisord's loop wakes once a
  second whatever its settings, and ``startsecs=0`` is its fastest restart);
* time from launching the daemon until 200 ``sleep`` children run (each tool with its modules
  compiled: the peers' by pip, otree's by ``compile_otree`` to a cache outside the checkout);
* processes left after a SIGTERM stop of the daemon, and after a SIGKILL of it,
  with children that each leave a background grandchild (each tool's defaults),
  as the number of runs that left anything, out of ``LEFTOVER_RUNS`` for otree
  (one run for the peers, which leave processes every time).

``python -m benchmarks.bench_process ab CHECKOUT...`` runs only otree's ``sh`` restart
row, five times for each checkout in turns (each put first on PYTHONPATH), with otree's
own CPU time per restart: an A/B of two versions of otree in one run.

Every child carries a marker in its environment; leftovers are found by it in
/proc and killed after each measurement. The last lines give otree's figures as
ratios to the floor and to the peers measured in the same run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

PEERS = Path(tempfile.gettempdir()) / "otree-bench-peers"
# otree's bytecode, kept outside the checkout: the peers run from pip installs, whose modules pip
# compiled, while otree runs from its source tree (where PYTHONDONTWRITEBYTECODE may keep it uncompiled)
PYCACHE = Path(tempfile.gettempdir()) / "otree-bench-pycache"
PY = sys.executable
RESTART_SECONDS = 5.0
IDLE_SECONDS = 20.0
HEAP_MB = 500
LEFTOVER_RUNS = 20


def peer_bin(name: str) -> str:
    return str(PEERS / "bin" / name)


def install_peers() -> None:
    if not (PEERS / "bin" / "circusd").exists() or not (PEERS / "bin" / "supervisord").exists():
        subprocess.run([PY, "-m", "venv", str(PEERS)], check=True)
        subprocess.run([peer_bin("pip"), "install", "-q", "supervisor", "circus"], check=True)


def compile_otree() -> None:
    """Write the bytecode of everything ``otree run`` imports (the otree on PYTHONPATH) to PYCACHE."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(PYCACHE)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([PY, "-c", "import otree._treecmd"], env=env, check=True, cwd=tempfile.gettempdir())


def marked(marker: str) -> list[int]:
    needle = f"BENCH_MARKER={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def kill_marked(marker: str) -> None:
    for pid in marked(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def running(marker: str, program: str) -> int:
    """How many processes with ``marker`` run ``program`` (the supervised ones, not daemons or helpers)."""
    count = 0
    for pid in marked(marker):
        with contextlib.suppress(OSError):
            count += Path(f"/proc/{pid}/comm").read_text().strip() == program
    return count


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(daemon: int, program: str) -> float:
    """CPU seconds of the daemon and of its children that do not run ``program`` (its helpers)."""
    total = cpu_seconds(daemon)
    for task in Path(f"/proc/{daemon}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() != program:
                    total += cpu_seconds(int(child))
    return total


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


# --- one daemon per tool -------------------------------------------------------------------------


class Daemon:
    """A supervising daemon running ``count`` copies of ``command`` with ``marker`` in their env."""

    def __init__(
        self,
        tool: str,
        work: Path,
        command: list[str],
        count: int,
        marker: str,
        *,
        fast: bool = False,
        heap_mb: int = 0,
    ) -> None:
        self.tool, self.work, self.command, self.count, self.marker = tool, work, command, count, marker
        self.fast = fast  # circus: poll every 1 ms (its fastest stable setting) instead of its default 5 s
        self.heap_mb = heap_mb  # otree: memory the tree file holds (every page touched)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "BENCH_MARKER": self.marker}
        if self.tool == "otree":
            env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)  # see compile_otree
        argv = getattr(self, f"_{self.tool}")()
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )

    def _otree(self) -> list[str]:
        tree = self.work / "tree.py"
        tree.write_text(
            "import otree\n"
            f"heap = bytearray({self.heap_mb} << 20)\n"
            "heap[::4096] = b'x' * len(range(0, len(heap), 4096))\n"
            f"tree = otree.supervisor('bench', max_restarts=10**9, max_seconds=1.0, children=[\n"
            f"    otree.process(f'c{{i}}', {self.command!r}, stdout='null', stderr='null', shutdown=5.0)\n"
            f"    for i in range({self.count})])\n"
        )
        return [PY, "-m", "otree", "run", str(tree), "--state-dir", str(self.work / "state")]

    def _supervisord(self) -> list[str]:
        conf = self.work / "supervisord.conf"
        conf.write_text(
            f"[supervisord]\nnodaemon=true\nlogfile={self.work}/supervisord.log\n"
            f"pidfile={self.work}/supervisord.pid\nloglevel=warn\n"
            f"[program:c]\ncommand={shlex.join(self.command)}\nnumprocs={self.count}\n"
            "process_name=%(program_name)s_%(process_num)s\nautorestart=true\nstartsecs=0\n"
            "startretries=1000000000\nstdout_logfile=NONE\nstderr_logfile=NONE\n"
        )
        return [peer_bin("supervisord"), "-c", str(conf)]

    def _circus(self) -> list[str]:
        ini = self.work / "circus.ini"
        ini.write_text(
            f"[circus]\ncheck_delay={0.001 if self.fast else 5}\nendpoint=ipc://{self.work}/c.sock\n"
            f"pubsub_endpoint=ipc://{self.work}/p.sock\nstats_endpoint=ipc://{self.work}/s.sock\n"
            f"[watcher:c]\ncmd={shlex.join(self.command)}\nnumprocesses={self.count}\n"
            "respawn=true\nmax_retry=-1\nwarmup_delay=0\ncopy_env=true\n"
        )
        return [peer_bin("circusd"), str(ini)]

    def stop(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


TOOLS = ("otree", "supervisord", "circus")


def restarts_per_second(tool: str, child: str, heap_mb: int = 0) -> float:
    return restart_sample(tool, child, heap_mb)[0]


def restart_sample(tool: str, child: str, heap_mb: int = 0) -> tuple[float, float]:
    """Restarts per second, and the daemon's own CPU seconds per restart (NaN for the floor)."""
    marker = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as work_dir:
        work = Path(work_dir)
        counter = work / "starts"
        if child == "sh":
            command = ["sh", "-c", f"echo >> {counter}; exit 1"]
        else:
            command = [PY, "-c", f"open({str(counter)!r}, 'a').write('\\n'); raise SystemExit(1)"]
        if tool == "floor":
            deadline = time.monotonic() + RESTART_SECONDS
            while time.monotonic() < deadline:
                subprocess.run(command, check=False)
            return counter.read_text().count("\n") / RESTART_SECONDS, math.nan
        daemon = Daemon(tool, work, command, 1, marker, fast=True, heap_mb=heap_mb)
        daemon.start()
        assert daemon.proc is not None
        wait_for(counter.exists, 60)
        first, cpu = counter.read_text().count("\n"), cpu_seconds(daemon.proc.pid)
        time.sleep(RESTART_SECONDS)  # a measured interval, not a synchronisation
        starts = counter.read_text().count("\n") - first
        cpu = cpu_seconds(daemon.proc.pid) - cpu
        daemon.stop()
        kill_marked(marker)
        return starts / RESTART_SECONDS, cpu / max(starts, 1)


def idle_cpu_and_start(tool: str) -> tuple[float, float]:
    """(CPU seconds the daemon used over IDLE_SECONDS with 50 sleeps, seconds until 200 sleeps run)."""
    marker = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as work_dir:
        work = Path(work_dir)
        t0 = time.monotonic()
        daemon = Daemon(tool, work, ["sleep", "100000"], 200, marker)
        daemon.start()
        if not wait_for(lambda: running(marker, "sleep") >= 200, 60):
            print(f"  {tool}: only {running(marker, 'sleep')} of 200 running after 60 s", flush=True)
        started = time.monotonic() - t0
        daemon.stop()
        kill_marked(marker)
    marker = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as work_dir:
        daemon = Daemon(tool, Path(work_dir), ["sleep", "100000"], 50, marker)
        daemon.start()
        wait_for(lambda: running(marker, "sleep") >= 50, 60)
        time.sleep(2.0)  # let start-up work finish before the idle interval
        assert daemon.proc is not None
        before = own_cpu_seconds(daemon.proc.pid, "sleep")
        time.sleep(IDLE_SECONDS)
        idle = own_cpu_seconds(daemon.proc.pid, "sleep") - before
        daemon.stop()
        kill_marked(marker)
    return idle, started


def leftovers(tool: str, signum: int) -> int:
    """Processes left 1 s after the daemon ended by ``signum``; children each leave a grandchild."""
    marker = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as work_dir:
        daemon = Daemon(tool, Path(work_dir), ["sh", "-c", "sleep 100000 & exec sleep 100000"], 5, marker)
        daemon.start()
        wait_for(lambda: running(marker, "sleep") >= 10, 60)
        daemon.stop(signum)
        time.sleep(1.0)  # the budget the issue gives for cleanup after a SIGKILL
        left = len(marked(marker))
        kill_marked(marker)
        return left


def leftover_runs(tool: str, signum: int, runs: int) -> tuple[int, int]:
    """(runs that left any process, processes left in all) over ``runs`` runs."""
    counts = [leftovers(tool, signum) for _ in range(runs)]
    return sum(1 for count in counts if count), sum(counts)


def ab_main(checkouts: list[str], rounds: int = 5) -> None:
    """otree's ``sh`` restart row for each checkout (its directory put first on PYTHONPATH), in turns."""
    samples: dict[str, list[tuple[float, float]]] = {checkout: [] for checkout in checkouts}
    os.chdir(tempfile.gettempdir())  # `python -m otree` puts its working directory before PYTHONPATH
    print(f"floor sh/s {restarts_per_second('floor', 'sh'):.0f}", flush=True)
    for _ in range(rounds):
        for checkout in checkouts:
            os.environ["PYTHONPATH"] = checkout  # the daemon inherits the environment
            compile_otree()
            rate, cpu = restart_sample("otree", "sh")
            samples[checkout].append((rate, cpu))
            print(f"{checkout}: {rate:.0f} restarts/s, {cpu * 1000:.3f} ms otree CPU per restart", flush=True)
    for checkout, runs in samples.items():
        rate = sorted(run[0] for run in runs)[len(runs) // 2]
        cpu = sorted(run[1] for run in runs)[len(runs) // 2]
        print(f"{checkout}: median {rate:.0f} restarts/s, {cpu * 1000:.3f} ms otree CPU per restart")


def main() -> None:
    if sys.argv[1:2] == ["ab"]:  # bench_process ab CHECKOUT... : A/B of the restart row, in turns
        ab_main(sys.argv[2:])
        return
    install_peers()
    compile_otree()
    print(
        f"{'':<12}{'sh/s':>8}{f'sh/s {HEAP_MB}M':>12}{'py/s':>8}{'idle CPU s':>12}{'200 up s':>10}"
        f"{'left stop':>14}{'left kill':>14}"
    )
    floor_sh = restarts_per_second("floor", "sh")
    floor_py = restarts_per_second("floor", "py")
    print(f"{'floor':<12}{floor_sh:>8.0f}{'':>12}{floor_py:>8.0f}", flush=True)
    rows: dict[str, dict[str, float]] = {}
    for tool in sys.argv[1:] or TOOLS:
        runs = LEFTOVER_RUNS if tool == "otree" else 1
        row = rows[tool] = {"sh": restarts_per_second(tool, "sh")}
        row["heap"] = restarts_per_second(tool, "sh", HEAP_MB) if tool == "otree" else math.nan
        row["py"] = restarts_per_second(tool, "py")
        row["idle"], row["up"] = idle_cpu_and_start(tool)
        stop_runs, stop_left = leftover_runs(tool, signal.SIGTERM, runs)
        kill_runs, kill_left = leftover_runs(tool, signal.SIGKILL, runs)
        row["stop_runs"], row["kill_runs"], row["runs"] = stop_runs, kill_runs, runs
        heap = "" if math.isnan(row["heap"]) else f"{row['heap']:.0f}"
        stop = f"{stop_left} ({stop_runs}/{runs})"
        kill = f"{kill_left} ({kill_runs}/{runs})"
        print(
            f"{tool:<12}{row['sh']:>8.0f}{heap:>12}{row['py']:>8.0f}{row['idle']:>12.3f}{row['up']:>10.3f}"
            f"{stop:>14}{kill:>14}",
            flush=True,
        )
    print("left: processes alive 1 s after the stop (runs that left any / runs)")
    otree = rows.get("otree")
    if otree is None:
        return
    print(f"otree sh/s / floor:               {otree['sh'] / floor_sh:6.0%}   (target >= 50%)")
    print(f"otree sh/s with {HEAP_MB} MB / floor:    {otree['heap'] / floor_sh:6.0%}   (target >= 50%)")
    if "circus" in rows:
        up = otree["up"] / rows["circus"]["up"]
        print(f"otree 200 up / circus 200 up:     {up:6.2f}   (target <= 0.5)")
    if "supervisord" in rows:
        idle = rows["supervisord"]["idle"]
        print(f"otree idle CPU / supervisord's:   {otree['idle']:.3f} s / {idle:.3f} s   (target: <=)")
    runs = int(otree["runs"])
    print(
        f"otree runs with leftovers:        {int(otree['stop_runs'])}/{runs} after SIGTERM, "
        f"{int(otree['kill_runs'])}/{runs} after SIGKILL   (target 0/{LEFTOVER_RUNS})"
    )


if __name__ == "__main__":
    main()
