"""Tests of the linear-probing trainer (beyond_cls.probe)."""
