"""Signal statistics: per-channel summary features of the process window -> logistic regression (the weld reference)."""

from defectscope.models.signal_stats.torch_model import STATISTICS, WeldSignalStats, signal_statistics

__all__ = ["STATISTICS", "WeldSignalStats", "signal_statistics"]
