"""Start and stop a local control plane N times; print start-to-ready and stop times.

    .venv/bin/python hack/envtest/measure_controlplane.py [N]
"""

from __future__ import annotations

import statistics
import sys
import time

from reactor_dev.devcluster.controlplane import ControlPlane


def main(runs: int) -> None:
    starts, stops = [], []
    for run in range(1, runs + 1):
        plane = ControlPlane()
        began = time.perf_counter()
        plane.start()
        ready = time.perf_counter()
        plane.stop()
        stopped = time.perf_counter()
        starts.append(ready - began)
        stops.append(stopped - ready)
        print(f"run {run}: start-to-ready {starts[-1]:.2f} s, stop {stops[-1]:.2f} s", flush=True)
    print(
        f"start-to-ready median {statistics.median(starts):.2f} s (min {min(starts):.2f}, max {max(starts):.2f}); "
        f"stop median {statistics.median(stops):.2f} s (max {max(stops):.2f})"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
