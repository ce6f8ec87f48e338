"""Benchmarks of the mount against what users would use instead (`make bench`)."""
