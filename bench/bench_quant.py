"""Same as `qviz bench quant`: materialization vs the clone floor, and cached re-selection."""

from qviz.bench import bench_quant

if __name__ == "__main__":
    bench_quant()
