"""Tests of the encoder zoo (beyond_cls.models)."""
