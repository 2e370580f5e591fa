"""Sweep throughput: one small grid in this process and on a LocalCluster."""

from __future__ import annotations

import time


def bench_sweep(model_name: str = "smollm2-135m", plan: str = "uniform") -> dict:
    """Cells per minute of one small grid (rtn, bits 2/3/4/8, g128, verdict + perplexity) run in
    this process and on a LocalCluster of 2 single-threaded workers; each worker's peak RSS."""
    import resource

    from distributed import Client, LocalCluster

    from qviz.sweep import Grid, run

    grid = Grid([model_name], ["rtn"], [2, 3, 4, 8], [128], [plan], ["verdict", "perplexity"])
    print(f"qviz bench sweep: {len(grid)} cells of {model_name} ({plan}), verdict + perplexity")
    t = time.perf_counter()
    run(grid, client=None, progress=False)
    serial = time.perf_counter() - t
    rate = len(grid) / serial * 60
    print(f"  none    : {serial:7.1f} s | {rate:6.2f} cells/min (model load incl.)")
    t = time.perf_counter()
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        up = time.perf_counter() - t
        run(grid, client=client, progress=False)
        local = time.perf_counter() - t
        peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
    print(
        f"  local:2 : {local:7.1f} s | {len(grid) / local * 60:6.2f} cells/min (cluster start "
        f"{up:.1f} s and model loads incl.) | ratio {serial / local:4.2f}x vs none"
    )
    for addr, mib in sorted(peaks.items()):
        print(f"  worker {addr}: peak RSS {mib:7.0f} MiB")
    return {
        "ratio": serial / local,
        "ratio_of": "cells per minute, local:2 over none",
        "cells_per_min_none": rate,
        "cells_per_min_local2": len(grid) / local * 60,
        "worker_peak_rss_mib": sorted(peaks.values()),
    }
