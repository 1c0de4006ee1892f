"""The chaos run (``benchmarks/chaos.py``): how it judges, how it cleans up, and a 30-second run of it."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from benchmarks.chaos import (
    Closing,
    Marks,
    Unanswered,
    ask,
    judge_pool,
    malformed_frame,
)
from otree._protocol import FrameError, FrameReader, decode_request

REPO = Path(__file__).resolve().parent.parent


def report(tag: str, job: str, pid: int, micros: int, nonce: str) -> dict[str, Any]:
    return {"e": "report", "tag": tag, "job": job, "pid": pid, "nonce": nonce, "micros": micros}


def charged(nonce: str) -> dict[str, Any]:
    return {"e": "charged", "nonce": nonce}


def done(tag: str, job: str, pid: int) -> dict[str, Any]:
    return {"e": "done", "tag": tag, "job": job, "pid": pid}


def test_an_accepted_job_neither_finished_nor_dead_lettered_is_lost() -> None:
    records = [report("a", "1", 100, 5, "n1"), charged("n1"), done("a", "1", 100)]
    verdict = judge_pool(["a", "b", "c"], records, killed=set(), dead=["c"], ledger={"1": 5})
    assert verdict.lost == ["b"]
    assert verdict.finished == 1
    assert verdict.failures() == ["1 jobs lost (e.g. b)"]


def test_a_job_that_ran_without_an_acknowledged_submit_is_counted_not_lost() -> None:
    verdict = judge_pool([], [done("x", "7", 100)], killed=set(), dead=[], ledger={})
    assert (verdict.lost, verdict.ran_unacked, verdict.failures()) == ([], 1, [])


def test_a_finish_repeated_after_a_sigkill_is_a_rerun_any_other_is_a_duplicate() -> None:
    records = [
        done("rerun", "1", 100),  # otree 100 was SIGKILLed before it recorded the job done
        done("rerun", "1", 200),
        done("stopped", "2", 300),  # otree 300 was stopped cleanly: it must not run the job again
        done("stopped", "2", 400),
        done("twice", "3", 100),  # the same otree finished it twice
        done("twice", "3", 100),
    ]
    verdict = judge_pool(["rerun", "stopped", "twice"], records, killed={100}, dead=[], ledger={})
    assert verdict.reruns == 1
    assert verdict.duplicates == ["stopped", "twice"]
    assert verdict.failures() == [
        "2 jobs finished again without a SIGKILL to explain it (e.g. stopped, twice)"
    ]


def test_the_ledger_must_match_the_reported_spend_job_by_job() -> None:
    records = [report("a", "1", 100, 40, "n1"), charged("n1"), report("b", "2", 100, 2, "n2"), charged("n2")]
    assert judge_pool(["a", "b"], records, set(), [], {"1": 40, "2": 2}).mismatched == []
    # the same total, spread over the wrong jobs
    assert judge_pool(["a", "b"], records, set(), [], {"1": 41, "2": 1}).mismatched == ["1", "2"]
    # spend in the ledger that no job reported
    assert judge_pool(["a", "b"], records, set(), [], {"1": 40, "2": 2, "3": 9}).mismatched == ["3"]


def test_a_report_cut_off_by_a_sigkill_may_be_in_the_ledger_or_not_but_only_whole() -> None:
    # otree was killed between the job's report record and its confirmation, twice
    records = [
        report("a", "1", 100, 30, "n1"),
        report("a", "1", 200, 12, "n2"),
        report("a", "1", 300, 7, "n3"),
    ]
    records.append(charged("n3"))
    for in_ledger in (7, 7 + 30, 7 + 12, 7 + 30 + 12):
        verdict = judge_pool(["a"], records, {100, 200}, [], {"1": in_ledger})
        assert (verdict.mismatched, verdict.unconfirmed) == ([], 2)
    for in_ledger in (0, 7 + 1, 7 + 29, 7 + 43):
        assert judge_pool(["a"], records, {100, 200}, [], {"1": in_ledger}).mismatched == ["1"]


def test_many_cut_off_reports_bound_the_ledger_from_both_sides() -> None:
    records = [report("a", "1", pid, 10, f"n{pid}") for pid in range(100, 120)]  # 20: too many subsets
    for in_ledger, mismatched in ((0, []), (150, []), (200, []), (201, ["1"])):
        assert judge_pool(["a"], records, set(range(100, 120)), [], {"1": in_ledger}).mismatched == mismatched


def test_marks_find_and_kill_only_the_processes_of_their_own_run() -> None:
    mine, other = Marks(uuid.uuid4().hex[:16]), Marks(uuid.uuid4().hex[:16])
    try:
        child = mine.launch(["sh", "-c", "sleep 300 & exec sleep 301"], "child")
        stranger = other.launch(["sleep", "302"], "child")
        deadline = time.monotonic() + 10
        while len(mine.scan()) < 2 and time.monotonic() < deadline:  # the shell's background sleep
            time.sleep(0.01)
        assert {proc.role for proc in mine.scan()} == {"child"}
        assert len(mine.scan()) == 2
        assert mine.close() == 2
        assert mine.scan() == []
        assert child.poll() is not None  # reaped by close()
        assert [proc.pid for proc in other.scan()] == [stranger.pid]
        with pytest.raises(Closing):
            mine.launch(["true"], "client")
    finally:
        mine.close()
        other.close()


def test_a_request_the_server_never_accepts_is_unanswered_within_its_deadline(tmp_path: Path) -> None:
    path = Path(os.environ["OTREE_RUNTIME_DIR"]) / f"chaos-{uuid.uuid4().hex[:8]}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.fspath(path))
        listener.listen(1)  # listens, never accepts: like a tree whose connection slots are all taken
        try:
            t0 = time.monotonic()
            with pytest.raises(Unanswered, match="timeout"):
                ask(path, "status", 0.5, path="")
            assert time.monotonic() - t0 < 2.0
        finally:
            path.unlink()
    with pytest.raises(Unanswered, match="no tree"):
        ask(path, "status", 0.5, path="")


def test_malformed_frames_never_make_a_request_that_could_change_the_tree() -> None:
    rng = random.Random(7)
    harmless = {"status", "no_such_op"}
    for _ in range(2000):
        reader = FrameReader(1 << 20)
        try:
            bodies = reader.feed(malformed_frame(rng))
            requests = [decode_request(body) for body in bodies]
        except FrameError:
            continue
        assert all(request.op in harmless for request in requests)


@pytest.mark.slow
def test_thirty_seconds_of_chaos_find_nothing_wrong() -> None:
    marks = Marks(uuid.uuid4().hex[:16])
    try:
        run = subprocess.run(
            [sys.executable, "-m", "benchmarks.chaos", "--duration", "30", "--run-id", marks.run_id],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert marks.scan() == []
    finally:
        marks.close()  # whatever the run left, should it have been killed itself
