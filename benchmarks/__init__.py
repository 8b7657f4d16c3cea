"""statekit benchmarks: ``python -m benchmarks`` (or ``python3 dev.py bench``).

Each case measures statekit and its baselines side by side in the same run and prints
ratios. Timings never appear in the test suite.
"""
