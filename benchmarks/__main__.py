"""``python -m benchmarks [REPEATS] [PART ...]``: otree's core against bare trio, side by side, as ratios.

PART is ``restart``, ``tree`` or ``scale`` (default: all three). Every figure is the median
of REPEATS runs (default 3), each in a fresh interpreter; the runs compared in one line
alternate (otree, trio, otree, ...), so a load that changes during the run weighs on both.
Wall and CPU time are both printed: on a shared machine the CPU figures are the steadier.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

Job = tuple[str, int, tuple[str, ...]]


def measure(jobs: list[Job], repeats: int) -> list[dict[str, float]]:
    """Median of each figure of each job over ``repeats`` rounds of fresh interpreters."""
    runs: list[list[dict[str, float]]] = [[] for _ in jobs]
    for _ in range(repeats):
        for results, (scenario, n, flags) in zip(runs, jobs, strict=True):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_core", scenario, str(n), *flags],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results.append(json.loads(out))
    return [{key: statistics.median(run[key] for run in results) for key in results[0]} for results in runs]


RESTARTS = [
    ("restart-otree-quiet", (), "otree logger quiet"),
    ("restart-otree", (), "default logging"),
    ("restart-otree", ("log-on",), "default logging + event log"),
    ("restart-otree-run", (), "every event printed, as otree run"),
]


def restarts(repeats: int, n: int = 2000) -> None:
    trio_run, *otree_runs = measure(
        [("restart-trio", n, ())] + [(scenario, n, flags) for scenario, flags, _ in RESTARTS], repeats
    )
    wall, cpu = trio_run["us_per_restart"], trio_run["cpu_us_per_restart"]
    print(f"restart ({n} crash->running cycles), bare trio (a task per run): {wall:.1f} us, CPU {cpu:.1f} us")
    for (_, _, label), run in zip(RESTARTS, otree_runs, strict=True):
        o_wall, o_cpu = run["us_per_restart"], run["cpu_us_per_restart"]
        print(
            f"  otree, {label + ':':36} {o_wall:6.1f} us (ratio {o_wall / wall:.2f}), "
            f"CPU {o_cpu:6.1f} us (ratio {o_cpu / cpu:.2f})"
        )


def trees(repeats: int) -> None:
    for n, flags in ((10_000, ()), (100_000, ()), (100_000, ("nogc",))):
        o, t = measure([("tree-otree", n, flags), ("tree-trio", n, flags)], repeats)
        label = f"{n:>7} idle children" + (" (gc disabled)" if flags else "")
        print(
            f"{label}: start otree {o['start_s']:.3f} s / trio {t['start_s']:.3f} s "
            f"(ratio {o['start_s'] / t['start_s']:.2f}, CPU {o['start_cpu_s'] / t['start_cpu_s']:.2f}); "
            f"stop otree {o['stop_s']:.3f} s / trio {t['stop_s']:.3f} s "
            f"(ratio {o['stop_s'] / t['stop_s']:.2f}, CPU {o['stop_cpu_s'] / t['stop_cpu_s']:.2f}); "
            f"RSS otree {o['kib_per_child']:.2f} KiB / trio {t['kib_per_child']:.2f} KiB per child "
            f"(ratio {o['kib_per_child'] / t['kib_per_child']:.2f}); building the specs {o['spec_s']:.3f} s"
        )


SCALE_ROWS = [
    ("start_cpu_us_per_child", "start, CPU us per child", "{:8.2f}"),
    ("stop_cpu_us_per_child", "stop, CPU us per child", "{:8.2f}"),
    ("kib_per_child", "memory, KiB per child", "{:8.2f}"),
    ("status_cpu_ms", "status snapshot, CPU ms", "{:8.2f}"),
    ("status_us_per_child", "status, CPU us per child", "{:8.2f}"),
    ("restart_cpu_us", "restart, CPU us", "{:8.2f}"),
    ("restart_us", "restart, wall us", "{:8.2f}"),
]


def scale(repeats: int) -> None:
    """How the per-child figures grow with the number of children, and with the supervisor's heap."""
    jobs: list[Job] = [("scale", n, ()) for n in (1_000, 10_000, 100_000)]
    jobs += [("scale", 1_000, (f"heap={mb}",)) for mb in (50, 250, 1000)]
    points = measure(jobs, repeats)
    for (_, n, _), point in zip(jobs, points, strict=True):
        point["status_us_per_child"] = point["status_cpu_ms"] * 1e3 / (n + 1)
    heads = ["1k", "10k", "100k"] + [f"{p['heap_mb']:.0f} MB" for p in points[3:]]
    print("scale: N idle children, and 1k children beside a heap of small tracked objects")
    print(f"{'':28}" + "".join(f"{h:>9}" for h in heads) + "   100k/1k")
    for key, label, fmt in SCALE_ROWS:
        cells = "".join(" " + fmt.format(p[key]) for p in points)
        print(f"{label:28}{cells}   {points[2][key] / points[0][key]:7.2f}")


PARTS = {"restart": restarts, "tree": trees, "scale": scale}


def main() -> None:
    args = sys.argv[1:]
    repeats = int(args.pop(0)) if args and args[0].isdigit() else 3
    parts = args or list(PARTS)
    print(f"median of {repeats} runs each, every run in a fresh interpreter")
    for part in parts:
        PARTS[part](repeats)


if __name__ == "__main__":
    main()
