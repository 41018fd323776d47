"""The benchmarks. Each runs as a module from the repository root: `python -m bench.bench_train`, ..."""
