"""The one exception type the data package raises for bad input.

Every message names *where* the problem is (file, variable, level, time or
channel) and *what was expected*, so a user can fix the input without reading
the code. ``DataError`` subclasses ``ValueError`` so generic callers that catch
``ValueError`` keep working.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad or inconsistent input data (missing variable/level, grid mismatch,
    NaN/Inf, time gaps/duplicates, unreadable file, empty selection, ...)."""
