"""The test suite, a package: shared helpers are imported absolutely (``from tests.tiny_probe import TINY``)."""
