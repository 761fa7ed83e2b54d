"""Information-flow analysis: the attention recorder, its summary, plots and the analyze job."""

from beyond_cls.analysis.recorder import AttentionRecorder
from beyond_cls.analysis.summary import AttentionSummary

__all__ = ["AttentionRecorder", "AttentionSummary"]
