"""Throughput and memory benchmarks that print ratios against baselines measured in the same run."""
