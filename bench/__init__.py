"""Benchmarks of the proxy modes and the control plane, and their report."""
