"""Helpers that start real services (clusters, servers) for tests and benchmarks."""
