"""Reload time of the embedded model with and without the cache's hash check, in one run.

"without": ``load_model(<converted folder>)``, which reads the files as they are (the old path);
"with": ``load_model("smollm2-135m")``, which first verifies every converted file's sha256.
Set QVIZ_CACHE to work on a copy of the cache.
"""

import statistics
import time

from qviz.models.load import EMBEDDED_NAME, ensure_embedded, load_model


def main(reps: int = 5) -> None:
    folder = str(ensure_embedded())  # converted and verified once before timing
    times: dict[str, list[float]] = {"without check": [], "with check": []}
    for _ in range(reps):  # interleaved, so load on the machine hits both alike
        for label, source in (("without check", folder), ("with check", EMBEDDED_NAME)):
            t = time.perf_counter()
            load_model(source, device="cpu")
            times[label].append(time.perf_counter() - t)
    base, checked = (statistics.median(v) for v in times.values())
    for label, v in times.items():
        print(
            f"{label:14s} median {statistics.median(v):.3f} s",
            "(runs: " + ", ".join(f"{x:.2f}" for x in v) + ")",
        )
    print(f"ratio with/without: {checked / base:.2f}x  (+{checked - base:.3f} s per load)")


if __name__ == "__main__":
    main()
