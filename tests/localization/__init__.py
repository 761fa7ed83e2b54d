"""Tests of MaxBoxAccV2 localization (beyond_cls.localization)."""
