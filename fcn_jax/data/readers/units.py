"""Units of source variables: recognise equivalent spellings, convert the convertible.

``unit_conversion(found, channel, where)`` gives the scale and offset turning a
file's values into the channel catalogue's (SI, as ERA5) units; anything else
is a :class:`~fcn_jax.data.errors.DataError` naming the variable.
"""

from __future__ import annotations

import re

from fcn_jax.data.channels import STANDARD_GRAVITY, Channel
from fcn_jax.data.errors import DataError


def _unit_key(u: str) -> str:
    """Normalise a unit string for comparison: 'm s**-1', 'm s-1', 'm/s' -> 'ms-1'."""
    u = u.strip().replace("**", "").replace("^", "").replace(" ", "").replace(".", "")
    u = u.replace("metre", "m").replace("meter", "m")
    # a/b/c -> a b-1 c-1 for the simple cases met in files
    if "/" in u:
        head, *tail = u.split("/")
        u = head + "".join(re.sub(r"^([a-zA-Z]+)(\d*)$", lambda m: f"{m.group(1)}-{m.group(2) or '1'}", t)
                           for t in tail)
    return u.lower()


_EQUIV: dict[str, set[str]] = {
    "m s**-1": {"ms-1"},
    "K": {"k", "kelvin", "degk"},
    "Pa": {"pa", "pascal"},
    "m**2 s**-2": {"m2s-2"},
    "%": {"%", "percent"},
    "kg m**-2": {"kgm-2", "mm"},
    "kg kg**-1": {"kgkg-1", "1"},
    "Pa s**-1": {"pas-1"},
    "m": {"m"},
}

#: (expected units, unit key found) -> (scale, offset, note); value_si = raw * scale + offset
_CONVERSIONS: dict[tuple[str, str], tuple[float, float, str]] = {
    ("m**2 s**-2", "m"): (STANDARD_GRAVITY, 0.0, "geopotential height (m) x g"),
    ("m**2 s**-2", "gpm"): (STANDARD_GRAVITY, 0.0, "geopotential height (gpm) x g"),
    ("Pa", "hpa"): (100.0, 0.0, "hPa -> Pa"),
    ("K", "degc"): (1.0, 273.15, "degC -> K"),
    ("K", "c"): (1.0, 273.15, "degC -> K"),
}


def unit_conversion(found: str | None, channel: Channel, where: str) -> tuple[float, float, str]:
    """Scale and offset that turn values in units ``found`` into ``channel.units``.

    A variable without a ``units`` attribute is taken to be in the catalogue's
    units (WB2 and CDS files always carry units; hand-made files often do not).

    Raises:
      DataError: units that are neither equivalent nor convertible.
    """
    if found is None or str(found).strip() == "":
        return 1.0, 0.0, ""
    key = _unit_key(str(found))
    expected = channel.units
    if key in _EQUIV.get(expected, set()) or key == _unit_key(expected):
        return 1.0, 0.0, ""
    conv = _CONVERSIONS.get((expected, key))
    if conv is not None:
        return conv
    raise DataError(
        f"{where}: units {found!r} cannot be converted to {expected!r} "
        f"(channel {channel.name}, {channel.long_name})"
    )
