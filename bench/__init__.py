"""Benchmarks and quality evaluations of Headstart (not run as tests). See bench/README.md."""
