"""Latency benchmarks against the PyTorch baselines, with the paper's latency model beside them.

A thin entry point: the runner lives in :mod:`hybridstitch.bench` (also ``hybridstitch bench``).

    python benchmarks/latency.py                      # testbed + synthetic, writes benchmarks/results/latency_cpu.*
    python benchmarks/latency.py --help
"""

import sys

from hybridstitch.bench import main

if __name__ == "__main__":
    sys.exit(main())
