"""The pool's priority queue against a plain model, under hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otree._jobqueue import JobQueue

# ops: ("push", priority) | ("pop",) | ("remove", index into pushed keys) | ("replace", index)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(-3, 3)),
        st.tuples(st.just("pop")),
        st.tuples(st.just("remove"), st.integers(0, 200)),
        st.tuples(st.just("replace"), st.integers(0, 200)),
    ),
    max_size=300,
)


@given(ops)
def test_jobqueue_pops_highest_priority_first_fifo_within_a_priority(operations: list[tuple]) -> None:  # type: ignore[type-arg]
    """A replaced key's successor (a coalesced job) keeps its place: its priority and its turn."""
    queue: JobQueue[int, int] = JobQueue()
    model: list[tuple[int, int]] = []  # (priority, key) in the order of their places
    keys = 0
    for op in operations:
        if op[0] == "push":
            queue.push(keys, op[1], op[1])
            model.append((op[1], keys))
            keys += 1
        elif op[0] == "pop":
            if not model:
                with pytest.raises(IndexError):
                    queue.pop()
                continue
            best = max(priority for priority, _ in model)
            expected = next(entry for entry in model if entry[0] == best)  # the oldest of the best
            model.remove(expected)
            assert queue.pop() == (expected[1], expected[0])
        elif op[0] == "replace":
            index = next((i for i, e in enumerate(model) if e[1] == op[1]), None)
            if index is None:
                with pytest.raises(KeyError):
                    queue.replace(op[1], keys, -1)
                continue
            priority = model[index][0]
            queue.replace(op[1], keys, priority)
            model[index] = (priority, keys)
            keys += 1
        else:
            key = op[1]
            entry = next((e for e in model if e[1] == key), None)
            assert queue.remove(key) == (entry[0] if entry else None)
            if entry:
                model.remove(entry)
        assert len(queue) == len(model)
        assert all(key in queue for _, key in model)
    ordered = sorted(range(len(model)), key=lambda i: (-model[i][0], i))
    assert [key for key, _ in queue] == [model[i][1] for i in ordered]


def test_jobqueue_refuses_a_key_queued_twice() -> None:
    queue: JobQueue[str, None] = JobQueue()
    queue.push("a", 0, None)
    with pytest.raises(KeyError):
        queue.push("a", 1, None)
    queue.push("b", 0, None)
    with pytest.raises(KeyError):
        queue.replace("a", "b", None)  # b is queued already
    assert [key for key, _ in queue] == ["a", "b"]


def test_jobqueue_compacts_after_many_removals() -> None:
    queue: JobQueue[int, int] = JobQueue()
    for key in range(5000):
        queue.push(key, 0, key)
    for key in range(4000):
        queue.remove(key)
    assert sum(len(b) for b in queue._buckets.values()) < 2 * len(queue) + 1100
    assert queue.pop() == (4000, 4000)
