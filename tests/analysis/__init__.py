"""Tests of the information-flow analysis (beyond_cls.analysis)."""
