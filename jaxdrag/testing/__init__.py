"""Helpers for jaxdrag's tests and benchmarks (not imported by the package itself)."""
