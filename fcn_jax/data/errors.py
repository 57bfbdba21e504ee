"""The one exception type the data package raises for bad input.

Every message names *where* the problem is (file, variable, level, time or
channel) and *what was expected*, so a user can fix the input without reading
the code. ``DataError`` is an :class:`fcn_jax.errors.InputError` (exit status 2), and
so a ``ValueError``.
"""

from __future__ import annotations

from fcn_jax.errors import InputError


class DataError(InputError):
    """Bad or inconsistent input data (missing variable/level, grid mismatch,
    NaN/Inf, time gaps/duplicates, unreadable file, empty selection, ...)."""
