"""Tests of the aggregation heads (beyond_cls.heads)."""
