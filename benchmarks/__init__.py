"""Forge's benchmarks: throughput, latency and memory against anchors measured in the same run."""
