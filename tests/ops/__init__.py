"""Tests of the fused ops (beyond_cls.ops) and their Triton and C++ kernels."""
