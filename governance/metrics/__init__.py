"""Prometheus metrics of the governance layer, served by ``python -m governance.metrics``."""

from governance.metrics.collector import GovernanceCollector

__all__ = ["GovernanceCollector"]
