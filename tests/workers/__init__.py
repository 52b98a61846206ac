"""Tests of the example deployment's tools and providers, against real files, processes and HTTP."""
