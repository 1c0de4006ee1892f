"""``python -m benchmarks``: otree's core against bare trio, side by side, as ratios."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys


def measure(scenario: str, n: int, repeats: int, *flags: str) -> dict[str, float]:
    """Median of each figure over ``repeats`` fresh interpreters."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_core", scenario, str(n), *flags],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        runs.append(json.loads(out))
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    print(f"median of {repeats} runs each, every run in a fresh interpreter")
    trio_us = measure("restart-trio", 2000, repeats)["us_per_restart"]
    for scenario in ("restart-otree", "restart-otree-quiet"):
        otree_us = measure(scenario, 2000, repeats)["us_per_restart"]
        print(
            f"{scenario} (2000 crash->running cycles): otree {otree_us:.1f} us, "
            f"bare trio {trio_us:.1f} us, ratio {otree_us / trio_us:.2f}"
        )
    for n, flags in ((10_000, ()), (100_000, ()), (100_000, ("nogc",))):
        o = measure("tree-otree", n, repeats, *flags)
        t = measure("tree-trio", n, repeats, *flags)
        label = f"{n:>7} idle children" + (" (gc disabled)" if flags else "")
        print(
            f"{label}: start otree {o['start_s']:.3f} s / trio {t['start_s']:.3f} s "
            f"(ratio {o['start_s'] / t['start_s']:.2f}); "
            f"stop otree {o['stop_s']:.3f} s / trio {t['stop_s']:.3f} s "
            f"(ratio {o['stop_s'] / t['stop_s']:.2f}); "
            f"RSS otree {o['kib_per_child']:.2f} KiB / trio {t['kib_per_child']:.2f} KiB per child "
            f"(ratio {o['kib_per_child'] / t['kib_per_child']:.2f}); building the specs {o['spec_s']:.3f} s"
        )


if __name__ == "__main__":
    main()
