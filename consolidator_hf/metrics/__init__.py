"""Offline metrics: top-1 accuracy through ``evaluate`` and the VTAB-1k aggregate."""

from .aggregate import vtab_aggregate
from .top1_accuracy import Top1Accuracy

__all__ = ["Top1Accuracy", "vtab_aggregate"]
