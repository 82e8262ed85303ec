"""Benchmark suites (run ``python bench/bench_<suite>.py``; ``ftkernels bench`` collects them)."""
