"""Tests of the datasets, transforms and loaders (beyond_cls.data)."""
