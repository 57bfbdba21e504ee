"""Channel catalogue: physical channels by name, and named channel sets.

A *channel* is one 2-D field per time step, e.g. ``z500`` (geopotential at
500 hPa) or ``t2m``. Experiments pick channels **by name**; the order of the
list is the order of the ``channel`` axis everywhere (store, batches, model).

Names follow FourCastNet (spec/evaluation.md §9, fourcastnet-model.md §11.2):

* surface channels have fixed names (``u10``, ``v10``, ``t2m``, ``sp``, ``msl``,
  ``tcwv``, ``u100``, ``v100``, ``sst``, ``tp``);
* pressure-level channels are ``<var><level in hPa>`` for ``var`` in
  ``u v t z r q w`` and any of the 37 ERA5 pressure levels, e.g. ``z500``,
  ``t850``, ``r1000``.

Each :class:`Channel` carries the names it has in every source format: the CDS
netCDF short name (``z``), the CDS request name (``geopotential``), the
WeatherBench 2 / ARCO long name (``geopotential``) and the level, plus SI units
as ERA5 writes them.

Named sets (:data:`CHANNEL_SETS`) are configuration, not code: ``fcn20`` is the
original 20 channels in the original order; ``fcn26`` is v0.1's 26; ``world``
is what the embedded world (:mod:`fcn_jax.data.world`) produces.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

from fcn_jax.config import FCN_CHANNELS
from fcn_jax.data.errors import DataError

#: Standard gravity (WMO), used to turn geopotential height (m) into
#: geopotential (m^2 s^-2).
STANDARD_GRAVITY = 9.80665

#: The 37 pressure levels (hPa) ERA5 is published on.
ERA5_LEVELS: tuple[int, ...] = (
    1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100, 125, 150, 175, 200, 225, 250, 300,
    350, 400, 450, 500, 550, 600, 650, 700, 750, 775, 800, 825, 850, 875, 900,
    925, 950, 975, 1000,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Channel:
    """One named 2-D field.

    Attributes:
      name: canonical channel name (``z500``, ``t2m``).
      cds_short: variable name inside a CDS netCDF file (``z``, ``t2m``).
      cds_request: CDS API request name (``geopotential``).
      wb2_name: WeatherBench 2 / ARCO-ERA5 zarr variable name.
      level: pressure level in hPa, or ``None`` for single-level fields.
      units: SI units as ERA5 writes them (``m**2 s**-2``).
      long_name: human-readable description.
    """

    name: str
    cds_short: str
    cds_request: str
    wb2_name: str
    level: int | None
    units: str
    long_name: str

    @property
    def is_pressure_level(self) -> bool:
        return self.level is not None


# --- single-level fields -----------------------------------------------------
_SURFACE: dict[str, Channel] = {
    c.name: c
    for c in [
        Channel("u10", "u10", "10m_u_component_of_wind", "10m_u_component_of_wind",
                None, "m s**-1", "10 metre U wind component"),
        Channel("v10", "v10", "10m_v_component_of_wind", "10m_v_component_of_wind",
                None, "m s**-1", "10 metre V wind component"),
        Channel("t2m", "t2m", "2m_temperature", "2m_temperature",
                None, "K", "2 metre temperature"),
        Channel("sp", "sp", "surface_pressure", "surface_pressure",
                None, "Pa", "Surface pressure"),
        Channel("msl", "msl", "mean_sea_level_pressure", "mean_sea_level_pressure",
                None, "Pa", "Mean sea level pressure"),
        Channel("tcwv", "tcwv", "total_column_water_vapour", "total_column_water_vapour",
                None, "kg m**-2", "Total column vertically-integrated water vapour"),
        Channel("u100", "u100", "100m_u_component_of_wind", "100m_u_component_of_wind",
                None, "m s**-1", "100 metre U wind component"),
        Channel("v100", "v100", "100m_v_component_of_wind", "100m_v_component_of_wind",
                None, "m s**-1", "100 metre V wind component"),
        Channel("sst", "sst", "sea_surface_temperature", "sea_surface_temperature",
                None, "K", "Sea surface temperature"),
        # ERA5 6-hourly accumulated precipitation, metres (fourcastnet-model.md §11.1).
        Channel("tp", "tp", "total_precipitation", "total_precipitation_6hr",
                None, "m", "Total precipitation (6-hour accumulation)"),
    ]
}  # fmt: skip

# --- pressure-level variables: short name -> (request/WB2 name, units, long name)
_PRESSURE_VARS: dict[str, tuple[str, str, str]] = {
    "u": ("u_component_of_wind", "m s**-1", "U component of wind"),
    "v": ("v_component_of_wind", "m s**-1", "V component of wind"),
    "t": ("temperature", "K", "Temperature"),
    "z": ("geopotential", "m**2 s**-2", "Geopotential"),
    "r": ("relative_humidity", "%", "Relative humidity"),
    "q": ("specific_humidity", "kg kg**-1", "Specific humidity"),
    "w": ("vertical_velocity", "Pa s**-1", "Vertical velocity"),
}

#: Alternative spellings met in the wild -> canonical name.
ALIASES: dict[str, str] = {
    "mslp": "msl",  # FourCastNet's own name for channel 4
    "10u": "u10", "10v": "v10", "2t": "t2m",  # ECMWF param short names
    "100u": "u100", "100v": "v100",
    "u10m": "u10", "v10m": "v10", "u100m": "u100", "v100m": "v100",  # Makani
}  # fmt: skip

_PL_NAME = re.compile(r"^([a-z])(\d+)$")


def get_channel(name: str) -> Channel:
    """Resolve one channel name (or alias) to its :class:`Channel`.

    Raises:
      DataError: for an unknown name, listing what is accepted.
    """
    key = ALIASES.get(name, name)
    if key in _SURFACE:
        return _SURFACE[key]
    m = _PL_NAME.match(key)
    if m and m.group(1) in _PRESSURE_VARS:
        var, level = m.group(1), int(m.group(2))
        if level not in ERA5_LEVELS:
            raise DataError(
                f"channel {name!r}: level {level} hPa is not an ERA5 pressure level; "
                f"expected one of {list(ERA5_LEVELS)}"
            )
        request, units, long_name = _PRESSURE_VARS[var]
        return Channel(
            name=f"{var}{level}", cds_short=var, cds_request=request,
            wb2_name=request, level=level, units=units,
            long_name=f"{long_name} at {level} hPa",
        )  # fmt: skip
    raise DataError(
        f"unknown channel {name!r}; expected a single-level name "
        f"{sorted(_SURFACE)} (aliases {sorted(ALIASES)}) or <var><level> with var in "
        f"{sorted(_PRESSURE_VARS)} and level an ERA5 pressure level (e.g. 'z500')"
    )


#: The original FourCastNet channels, in the original order (index = position); defined in
#: :data:`fcn_jax.config.FCN_CHANNELS` (the configuration's default, a lower layer).
FCN_20: tuple[str, ...] = FCN_CHANNELS

#: FourCastNet v0.1: the 20 plus 100 m winds and the 250 hPa level.
FCN_26: tuple[str, ...] = FCN_20 + ("u100", "v100", "u250", "v250", "z250", "t250")

#: Channels of the embedded world (see fcn_jax.data.world for what each means
#: there; u10/v10/t2m are the lowest model level, sigma = 0.9375).
WORLD: tuple[str, ...] = (
    "u10", "v10", "t2m", "sp",
    "u850", "v850", "t850", "z850",
    "u500", "v500", "t500", "z500",
    "u250", "v250", "t250", "z250",
)  # fmt: skip

#: Layout of the original HDF5 year files: 21 channels, the last unused
#: (probably SST; never used by a released model). ``None`` = skip.
FCN_HDF5_LAYOUT: tuple[str | None, ...] = FCN_20 + (None,)

#: Named channel sets usable wherever a channel list is expected.
CHANNEL_SETS: dict[str, tuple[str, ...]] = {
    "fcn20": FCN_20,
    "fcn26": FCN_26,
    "world": WORLD,
}


def resolve_channels(spec: str | Iterable[str]) -> list[Channel]:
    """Turn a channel specification into an ordered list of :class:`Channel`.

    ``spec`` is a set name from :data:`CHANNEL_SETS`, a comma-separated string
    (``"z500,t850"``), or a sequence of names; set names may appear inside a
    list too (``["fcn20", "u250"]``). Duplicates are an error because they
    would silently double a channel in the loss.
    """
    if isinstance(spec, str):
        items: Sequence[str] = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    names: list[str] = []
    for item in items:
        if item in CHANNEL_SETS:
            names.extend(CHANNEL_SETS[item])
        else:
            names.append(item)
    if not names:
        raise DataError("empty channel list; expected channel names or a set name "
                        f"from {sorted(CHANNEL_SETS)}")
    channels = [get_channel(n) for n in names]
    seen: set[str] = set()
    for c in channels:
        if c.name in seen:
            raise DataError(f"channel {c.name!r} is listed twice in {list(items)}")
        seen.add(c.name)
    return channels


def channel_names(spec: str | Iterable[str]) -> list[str]:
    """Canonical names for a channel specification (see :func:`resolve_channels`)."""
    return [c.name for c in resolve_channels(spec)]
