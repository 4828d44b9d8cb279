"""Throughput / memory / compile-time measurements (not tests); see README.md."""
