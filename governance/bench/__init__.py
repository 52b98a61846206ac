"""Benchmarks run by ``make bench``: measured in one run, on this machine, printed and saved."""
