"""Channel catalogue: the original 20 in order, other sets by name, clear errors."""

import pytest

from fcn_jax.data.channels import (
    CHANNEL_SETS,
    FCN_20,
    FCN_26,
    FCN_HDF5_LAYOUT,
    WORLD,
    get_channel,
    resolve_channels,
)  # fmt: skip
from fcn_jax.data.errors import DataError


def test_fcn20_order_and_era5_names():
    assert FCN_20 == ("u10", "v10", "t2m", "sp", "msl", "t850", "u1000", "v1000", "z1000", "u850",
                      "v850", "z850", "u500", "v500", "z500", "t500", "z50", "r500", "r850", "tcwv")
    chans = resolve_channels("fcn20")
    # spec/evaluation.md §9: CDS request name, netCDF short name, level, WB2 long name
    table = {
        "u10": ("10m_u_component_of_wind", "u10", None, "10m_u_component_of_wind", "m s**-1"),
        "sp": ("surface_pressure", "sp", None, "surface_pressure", "Pa"),
        "msl": ("mean_sea_level_pressure", "msl", None, "mean_sea_level_pressure", "Pa"),
        "t850": ("temperature", "t", 850, "temperature", "K"),
        "z1000": ("geopotential", "z", 1000, "geopotential", "m**2 s**-2"),
        "z50": ("geopotential", "z", 50, "geopotential", "m**2 s**-2"),
        "r500": ("relative_humidity", "r", 500, "relative_humidity", "%"),
        "tcwv": ("total_column_water_vapour", "tcwv", None, "total_column_water_vapour", "kg m**-2"),
    }
    for c in chans:
        if c.name in table:
            assert (c.cds_request, c.cds_short, c.level, c.wb2_name, c.units) == table[c.name]
    assert [c.name for c in chans] == list(FCN_20)


def test_sets_and_aliases():
    assert FCN_26[:20] == FCN_20 and FCN_26[20:] == ("u100", "v100", "u250", "v250", "z250", "t250")
    assert set(CHANNEL_SETS) >= {"fcn20", "fcn26", "world"}
    assert [c.name for c in resolve_channels(["world"])] == list(WORLD)
    assert [c.name for c in resolve_channels("mslp, 10u, z700")] == ["msl", "u10", "z700"]
    assert [c.name for c in resolve_channels(["fcn20", "u250"])][-1] == "u250"
    assert FCN_HDF5_LAYOUT[:20] == FCN_20 and FCN_HDF5_LAYOUT[20] is None
    assert get_channel("q925").units == "kg kg**-1"


@pytest.mark.parametrize("bad,match", [("foo", "unknown channel"), ("z123", "not an ERA5 pressure level"),
                                       ("z500,z500", "listed twice"), ("", "empty channel list")])
def test_bad_channel_names(bad, match):
    with pytest.raises(DataError, match=match):
        resolve_channels(bad)
