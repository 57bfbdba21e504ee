"""The test suite: a package, so tests import their shared modules as ``tests.helpers``, ``tests.reference_fcn``..."""
