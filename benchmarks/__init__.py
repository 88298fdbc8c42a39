"""Side-by-side benchmarks of zmqps against its peers (not part of the test suite).

Run one with ``python -m benchmarks NAME [options]`` (``make bench ARGS=NAME``); ``python -m
benchmarks`` lists them. Every benchmark runs zmqps and the peer in the same invocation,
alternating, several repetitions, and reports the median of the per-repetition ratios, so a
machine shared with other work still gives a fair comparison.
"""
