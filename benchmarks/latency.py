"""Latency benchmarks against the PyTorch baselines, with the paper's latency model beside them.

A thin entry point: the benchmark lives in :mod:`hybridstitch.bench.latency` (also ``hybridstitch bench``).

    python benchmarks/latency.py                      # testbed + synthetic, writes benchmarks/results/latency_cpu.*
    python benchmarks/latency.py --help
"""

import sys

from hybridstitch.bench.latency import main

if __name__ == "__main__":
    sys.exit(main())
