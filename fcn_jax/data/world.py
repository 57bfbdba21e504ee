"""The embedded world: ERA5-shaped data with real dynamics, generated offline.

A dry primitive-equation atmosphere (``dinosaur``, Google's JAX spectral
dynamical core) with Held & Suarez (1994) forcing -- Newtonian relaxation to a
zonally symmetric radiative-equilibrium temperature plus Rayleigh friction in
the boundary layer -- on a flat planet. From a resting isothermal state with a
small surface-pressure bump (its position set by the seed) baroclinic
instability grows into midlatitude storms with jets, fronts and a turbulent
statistically steady climate: genuine weather that persistence fails to
forecast after a day or two.

Configuration (defaults; :class:`WorldSpec`):

* T21 spectral truncation, 32 x 64 Gaussian grid, 8 equidistant sigma levels,
  90-minute semi-implicit IMEX-RK step (``imex_rk_sil3``) with the exponential
  hyperdiffusion filter of dinosaur's Held-Suarez example;
* 200 days of spin-up discarded, then ``days`` of 6-hourly output dated from
  2000-01-01 00 UTC on the Gregorian calendar (the model has no seasons or
  diurnal cycle; dates only label time);
* output conservatively regridded to a regular equiangular 32 x 64 grid
  without poles (latitude 87.1875 ... -87.1875 north -> south, longitude
  0 ... 354.375), like WeatherBench 2's 64x32 stores.

Channels (:data:`fcn_jax.data.channels.WORLD`), ERA5 names and units:

=========================  =========  =========================================
channel                    units      what it is here
=========================  =========  =========================================
u10, v10                   m s**-1    wind at the lowest model level (sigma 0.9375,
                                      ~600 m): stands in for 10 m wind
t2m                        K          temperature at the lowest model level
sp                         Pa         surface pressure (= mean sea level pressure:
                                      the planet is flat)
u, v, t, z at 850/500/250  SI         wind, temperature, geopotential on pressure
                                      levels (linear in sigma from the model levels)
tp (store only)            m          large-scale precipitation *proxy*, 6 h
                                      accumulation ending at the time stamp
                                      (below); the target of precipitation
                                      training, not a model input
=========================  =========  =========================================

Precipitation proxy. The model is dry: it carries no water, so nothing in it
rains. To give the precipitation model (PrecipNet, training mode ``precip``) a
learnable, physically shaped target, the generator diagnoses a Kuo-style
moisture-convergence rate from the 850 hPa state after the run
(:func:`large_scale_precip_rate`)::

    rate = max(0, -div(u850, v850)) * q_sat(t850, 850 hPa) * max(sp - 700 hPa, 0) / g

Low-level convergence forces ascent; the layer from the surface to 700 hPa
(which holds most of the atmosphere's water vapour) is assumed saturated at the
850 hPa temperature (Clausius-Clapeyron via Bolton 1980), and all the water it
converges is taken to fall out at once -- no storage, no re-evaporation, no
convection scheme. The divergence is the spherical one,
``(du/dlambda + d(v cos phi)/dphi) / (a cos phi)``, by centred differences on the
output grid (periodic in longitude, one-sided at the outermost rows), so the
target is an exact function of model channels at the interval's two ends.
ERA5's convention is kept (fourcastnet-model.md §11.1): ``tp`` at time ``k`` is
the accumulation over the 6 h *ending* at ``k``, here the trapezoid
``(rate[k-1] + rate[k]) / 2 * 6 h`` in metres of water (the rate 6 h before the
first output comes from the last spin-up state). Zero wherever both ends diverge. It is a diagnostic of the dry
dynamics -- storm-track and ITCZ-like convergence, with sensible magnitudes --
and not a moist model: no latent heating feeds back on the flow and no humidity
is conserved. Measured (default spec, all four years): mean 8.0e-4 m per 6 h
(3.2 mm/day; 4.4 mm/day area-weighted, Earth's is about 2.7), 43% exact zeros,
median 5.9e-5 m, 99th percentile 8.9e-3 m, maximum 0.030 m; the zonal mean
peaks near 10 mm/day at the equator (the Hadley cell's convergence) and falls to
1-2 mm/day in the storm tracks and below 0.5 mm/day at 60-80 degrees (the
outermost rows, differenced one-sidedly, read about 1 mm/day).

Files are written as CDS netCDF in the *new* convention (``valid_time``,
``pressure_level``, ``number``/``expver`` coordinates), one single-level (with
``tp``) and one pressure-level file per year, so preparing the world runs the
same reader as real ERA5. The store holds :data:`WORLD_STORE_CHANNELS`: the 16
model channels of :data:`~fcn_jax.data.channels.WORLD`, then ``tp``.
:func:`fcn_jax.data.catalog.world_store` generates (once), prepares (once) and
returns the store path; both steps are cached on disk keyed by the spec. This
module only generates; it imports nothing of the store.

Years: with the default 1461 days, 2000-2001 train, 2002 validation, 2003 test
(:func:`world_splits`); statistics come from the training years.

Measured (default spec, seed 0, 2-core CPU shared with other jobs): 160 s to
simulate and write and 7 s to prepare (242 s + 20 s under heavier load);
about 0.5 GB of netCDF and a 0.7 GB store. With ``tp`` (version 2): 166 s + 8 s
(load average ~4.5 on the 2 cores), 0.55 GB of netCDF, a 0.8 GB store; the
proxy itself costs about a second.
Persistence on the test year, RMSE normalised by that of the time-mean
climatology, mean over the 16 model channels (:func:`persistence_skill` with
``channels=WORLD``):

=========  ====  ====  ====  ====  ====  ====  ====
lead (h)     6    12    24    36    48    72   120
nRMSE      0.22  0.42  0.75  0.97  1.10  1.22  1.31
=========  ====  ====  ====  ====  ====  ====  ====

Persistence is worse than climatology from about 36 h and approaches the
decorrelated limit sqrt(2) after five days; the zonal-mean jet peaks near
27 m/s at 250 hPa (Held & Suarez report about 30 m/s).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from fcn_jax.data.channels import WORLD
from fcn_jax.data.errors import DataError

#: Bump when generation changes in a way that alters the output (invalidates caches).
#: 2: the ``tp`` precipitation proxy in the files and the store.
WORLD_VERSION = 2

#: Channels of the world's store: the model's 16 inputs, then the precipitation target.
WORLD_STORE_CHANNELS: tuple[str, ...] = (*WORLD, "tp")

#: Constants of the precipitation proxy (SI).
EARTH_RADIUS_M = 6.37122e6  # dinosaur's planet (PrimitiveEquationsSpecs.from_si defaults)
GRAVITY = 9.80616
WATER_DENSITY = 1000.0  # kg m**-3: kg m**-2 of water -> m
PRECIP_LEVEL_PA = 85000.0  # the level whose wind, temperature define the proxy
PRECIP_LAYER_TOP_PA = 70000.0  # top of the moist layer whose convergence rains out

#: Default simulated days after spin-up: 2000-2003 (4 calendar years).
DEFAULT_DAYS = 1461


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """Everything that determines the world's output (the cache key)."""

    seed: int = 0
    days: int = DEFAULT_DAYS
    spinup_days: int = 200
    start: str = "2000-01-01T00:00"
    # 90 min: 4 steps per output; stable over 4+ years and the same climate as
    # 60 min to ~1-2% in every channel's mean and std (checked), 1/3 cheaper.
    dt_minutes: int = 90
    truncation: int = 21  # T21 ...
    gaussian_nodes: int = 16  # ... on 2*16 = 32 latitudes x 4*16 = 64 longitudes
    layers: int = 8
    levels: tuple[int, ...] = (250, 500, 850)
    version: int = WORLD_VERSION

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return f"world-s{self.seed}-d{self.days}-{hashlib.sha256(blob).hexdigest()[:10]}"


def default_cache_dir() -> Path:
    """``$FCN_JAX_CACHE/world`` or ``~/.cache/fcn_jax/world``."""
    root = os.environ.get("FCN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fcn_jax")
    return Path(root) / "world"


def world_splits(days: int = DEFAULT_DAYS, start: str = WorldSpec.start) -> dict[str, list[int]]:
    """Train / valid / test years of a world of ``days`` days from ``start``.

    Three or more calendar years: the last is test, the one before valid, the
    rest train. Two: first train, second valid and test. One: all three.
    """
    t0 = np.datetime64(start, "h")
    t1 = t0 + np.timedelta64(days * 24 - 6, "h")
    y0, y1 = int(str(t0)[:4]), int(str(t1)[:4])
    years = list(range(y0, y1 + 1))
    if len(years) >= 3:
        return {"train": years[:-2], "valid": [years[-2]], "test": [years[-1]]}
    if len(years) == 2:
        return {"train": years[:1], "valid": years[1:], "test": years[1:]}
    return {"train": years, "valid": years, "test": years}


# ------------------------------------------------------ precipitation proxy
def saturation_specific_humidity(t, p):
    """Saturation specific humidity (kg/kg) at temperature ``t`` (K) and pressure ``p`` (Pa).

    Clausius-Clapeyron in Bolton's (1980) form over liquid water,
    ``e_s = 611.2 exp(17.67 (T - 273.15) / (T - 29.65))`` Pa, and
    ``q_s = eps e_s / (p - (1 - eps) e_s)`` with ``eps = 0.622``.
    """
    t = np.asarray(t, np.float64)
    es = 611.2 * np.exp(17.67 * (t - 273.15) / (t - 29.65))
    return 0.622 * es / (np.asarray(p, np.float64) - 0.378 * es)


def spherical_divergence(u, v, lat, lon, radius: float = EARTH_RADIUS_M):
    """Horizontal divergence (s**-1) of the wind ``u, v [..., lat, lon]`` (m/s) on a sphere.

    ``div = (du/dlambda + d(v cos phi)/dphi) / (a cos phi)``, by centred
    differences: periodic in longitude (the grid spans the full circle with
    uniform spacing), second order inside in latitude and first order at the
    outermost rows (``np.gradient``). ``lat``/``lon`` in degrees, ``lat`` in
    either order (the derivative follows the coordinate); no pole rows.
    """
    u = np.asarray(u, np.float64)
    v = np.asarray(v, np.float64)
    phi = np.deg2rad(np.asarray(lat, np.float64))
    lam = np.deg2rad(np.asarray(lon, np.float64))
    dlam = lam[1] - lam[0]
    if not np.allclose(np.diff(lam), dlam) or not np.isclose(lam[-1] + dlam - lam[0], 2 * np.pi):
        raise ValueError("spherical_divergence: lon must be uniform and span the full circle (periodic)")
    cos = np.cos(phi)[:, None]  # [lat, 1]
    du_dlam = (np.roll(u, -1, axis=-1) - np.roll(u, 1, axis=-1)) / (2 * dlam)
    dvcos_dphi = np.gradient(v * cos, phi, axis=-2)
    return (du_dlam + dvcos_dphi) / (radius * cos)


def large_scale_precip_rate(u850, v850, t850, sp, lat, lon):
    """The world's precipitation proxy: rate in kg m**-2 s**-1 (= mm/s), ``[..., lat, lon]``.

    ``max(0, -div(u850, v850)) * q_sat(t850, 850 hPa) * max(sp - 700 hPa, 0) / g``:
    the water a saturated surface-to-700 hPa layer converges, all rained out
    (see the module docstring for what this is and is not). Non-negative.
    """
    conv = np.maximum(-spherical_divergence(u850, v850, lat, lon), 0.0)
    layer = np.maximum(np.asarray(sp, np.float64) - PRECIP_LAYER_TOP_PA, 0.0) / GRAVITY  # kg m**-2 of air
    return conv * saturation_specific_humidity(t850, PRECIP_LEVEL_PA) * layer


def accumulate_6h(rates, rate_before):
    """6 h accumulations in metres from instantaneous rates at 6-hourly times.

    ``rates [time, ...]`` (kg m**-2 s**-1) at times ``t_0 .. t_{n-1}`` and
    ``rate_before [...]`` at ``t_0 - 6 h``. Entry ``k`` covers the 6 h ending at
    ``t_k`` (ERA5's convention): the trapezoid ``(rate[k-1] + rate[k]) / 2 * 6 h``,
    divided by the density of water.
    """
    rates = np.asarray(rates, np.float64)
    prev = np.concatenate([np.asarray(rate_before, np.float64)[None], rates[:-1]])
    return 0.5 * (prev + rates) * (6 * 3600.0) / WATER_DENSITY


def _precip_from_fields(fields: dict[str, np.ndarray], before: dict[str, np.ndarray], levels, lat, lon,
                        block: int = 512) -> np.ndarray:
    """``tp`` (m) for the generator's output, in its layout ``[time, lon, lat]`` (lat ascending).

    ``fields``: ``u``/``v``/``t`` ``[time, level, lon, lat]`` (levels ascending)
    and ``sp`` ``[time, lon, lat]``; ``before``: the same diagnostics of the
    state 6 h before the first output, without the time axis.
    """
    if 850 not in levels:
        raise ValueError(f"WorldSpec.levels={tuple(levels)}: the precipitation proxy needs 850 hPa")
    li = sorted(levels).index(850)

    def rate(u, v, t, sp):  # inputs [..., lon, lat] -> rate [..., lat, lon]
        sw = lambda x: np.swapaxes(x, -1, -2)  # noqa: E731
        return large_scale_precip_rate(sw(u), sw(v), sw(t), sw(sp), lat, lon)

    r_before = rate(before["u"][li], before["v"][li], before["t"][li], before["sp"])
    n = fields["sp"].shape[0]
    tp = np.empty(fields["sp"].shape, np.float32)  # [time, lon, lat]
    for t0 in range(0, n, block):  # blocks: float64 temporaries stay small
        t1 = min(n, t0 + block)
        r = rate(fields["u"][t0:t1, li], fields["v"][t0:t1, li], fields["t"][t0:t1, li], fields["sp"][t0:t1])
        tp[t0:t1] = np.swapaxes(accumulate_6h(r, r_before), -1, -2)
        r_before = r[-1]
    return tp


# --------------------------------------------------------------------- model
def _build(spec: WorldSpec):
    """dinosaur model pieces: (chunk function, initial state, output grid)."""
    import jax
    import jax.numpy as jnp
    from dinosaur import (
        coordinate_systems,
        held_suarez,
        horizontal_interpolation,
        primitive_equations,
        primitive_equations_states,
        scales,
        sigma_coordinates,
        spherical_harmonic,
        time_integration,
        vertical_interpolation,
        xarray_utils,
    )

    units = scales.units
    grid = spherical_harmonic.Grid.construct(spec.truncation, spec.gaussian_nodes)
    coords = coordinate_systems.CoordinateSystem(grid, sigma_coordinates.SigmaCoordinates.equidistant(spec.layers))
    physics = primitive_equations.PrimitiveEquationsSpecs.from_si()
    p0 = 1e5 * units.pascal
    init_fn, aux = primitive_equations_states.isothermal_rest_atmosphere(
        coords, physics, p0=p0, p1=5e3 * units.pascal)
    state0 = init_fn(jax.random.PRNGKey(spec.seed))
    ref_temps = aux[xarray_utils.REF_TEMP_KEY]
    orography = primitive_equations.truncated_modal_orography(aux[xarray_utils.OROGRAPHY], coords)
    equation = time_integration.compose_equations([
        primitive_equations.PrimitiveEquations(ref_temps, orography, coords, physics),
        held_suarez.HeldSuarezForcing(coords=coords, physics_specs=physics, reference_temperature=ref_temps, p0=p0),
    ])
    dt = physics.nondimensionalize(spec.dt_minutes * units.minute)
    step = time_integration.imex_rk_sil3(equation, dt)
    # Scale-selective hyperdiffusion as in dinosaur's Held-Suarez example: removes
    # the enstrophy pile-up at the truncation without touching resolved scales.
    step = time_integration.step_with_filters(
        step, [time_integration.exponential_step_filter(grid, dt, tau=0.0087504, order=1.5, cutoff=0.8)])
    if (6 * 60) % spec.dt_minutes:
        raise ValueError(f"dt_minutes={spec.dt_minutes} must divide 6 hours")
    inner = (6 * 60) // spec.dt_minutes

    # Output grid: equiangular without poles, same node count as the Gaussian grid.
    target = spherical_harmonic.Grid.construct(spec.truncation, spec.gaussian_nodes,
                                               latitude_spacing="equiangular")
    regrid = horizontal_interpolation.ConservativeRegridder(grid, target)
    plevels = vertical_interpolation.PressureCoordinates(
        np.asarray([physics.nondimensionalize(lv * 100 * units.pascal) for lv in sorted(spec.levels)]))
    to_si = {
        "wind": physics.dimensionalize(1.0, units.m / units.s).m,
        "temp": physics.dimensionalize(1.0, units.degK).m,
        "pres": physics.dimensionalize(1.0, units.pascal).m,
        "geo": physics.dimensionalize(1.0, units.m**2 / units.s**2).m,
    }

    def diagnose(s):
        # Model state (spectral vorticity/divergence/T'/log ps) -> ERA5-like fields.
        # Arrays here are [level, lon, lat] (dinosaur's nodal layout).
        u, v = spherical_harmonic.vor_div_to_uv_nodal(grid, s.vorticity, s.divergence)
        t = ref_temps[:, None, None] + grid.to_nodal(s.temperature_variation)
        sp = jnp.exp(grid.to_nodal(s.log_surface_pressure))  # [1, lon, lat]
        z = primitive_equations.get_geopotential_on_sigma(
            t, nodal_orography=grid.to_nodal(orography), sigma=coords.vertical,
            gravity_acceleration=physics.g, ideal_gas_constant=physics.R)
        on_p = vertical_interpolation.interp_sigma_to_pressure(
            {"u": u, "v": v, "t": t, "z": z}, plevels, coords.vertical, sp)
        out = {
            "u10": u[-1] * to_si["wind"], "v10": v[-1] * to_si["wind"], "t2m": t[-1] * to_si["temp"],
            "sp": sp[0] * to_si["pres"],
            "u": on_p["u"] * to_si["wind"], "v": on_p["v"] * to_si["wind"],
            "t": on_p["t"] * to_si["temp"], "z": on_p["z"] * to_si["geo"],
        }
        return {k: regrid(x) for k, x in out.items()}  # [..., lon, lat] on the target grid

    chunk_days = 10
    # Keep the (small, spectral) states inside the time loop and diagnose them
    # afterwards in one batched call: cheaper than diagnosing inside the scan.
    trajectory = time_integration.trajectory_from_step(step, outer_steps=4 * chunk_days, inner_steps=inner)
    batched_diagnose = jax.vmap(diagnose)

    @jax.jit
    def run_chunk(s):
        s, states = trajectory(s)
        return s, batched_diagnose(states)

    spin = jax.jit(time_integration.repeated(step, inner * 4 * chunk_days))
    lat = np.rad2deg(target.latitudes)  # ascending
    lon = np.rad2deg(target.longitudes)
    # one state's diagnostics: the end of spin-up, 6 h before the first output,
    # opens the first precipitation accumulation
    diagnose_one = jax.jit(diagnose)
    return run_chunk, spin, diagnose_one, state0, chunk_days, lat, lon, (step, inner, batched_diagnose, grid)


def _write_year(nc_dir: Path, year: int, times: np.ndarray, fields: dict[str, np.ndarray],
                lat: np.ndarray, lon: np.ndarray, levels: tuple[int, ...], spec: WorldSpec) -> list[str]:
    """One CDS-style (new convention) single-level and pressure-level file."""
    import xarray as xr

    from fcn_jax.data.channels import get_channel

    # fields[k]: [time, (level,) lon, lat] with lat ascending -> [time, (level,) lat, lon], north first.
    def cds(x):
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)[..., ::-1, :], dtype=np.float32)

    coords = {
        "valid_time": times,
        "latitude": ("latitude", lat[::-1].astype(np.float64), {"units": "degrees_north"}),
        "longitude": ("longitude", lon.astype(np.float64), {"units": "degrees_east"}),
        "number": 0,
        "expver": ("valid_time", np.array(["0001"] * len(times))),
    }
    attrs = {
        "title": "fcn_jax embedded world: dinosaur primitive equations, Held-Suarez forcing",
        "world_spec": json.dumps(dataclasses.asdict(spec)),
        "Conventions": "CF-1.7",
    }
    stand_in = {"u10": "lowest model level (sigma=0.9375), stands in for 10 m",
                "v10": "lowest model level (sigma=0.9375), stands in for 10 m",
                "t2m": "lowest model level (sigma=0.9375), stands in for 2 m",
                "sp": "flat planet: equals mean sea level pressure",
                "tp": "large-scale precipitation proxy of the dry model: max(0, -div(u850, v850)) * "
                      "q_sat(t850, 850 hPa) * (sp - 700 hPa) / g, accumulated over the 6 h ending at "
                      "valid_time (fcn_jax.data.world)"}
    sfc = xr.Dataset(
        {k: (("valid_time", "latitude", "longitude"), cds(fields[k]),
             {"units": get_channel(k).units, "long_name": get_channel(k).long_name, "comment": stand_in[k]})
         for k in ("u10", "v10", "t2m", "sp", "tp")},
        coords=coords, attrs=attrs)
    plev = sorted(levels)
    pl = xr.Dataset(
        {k: (("valid_time", "pressure_level", "latitude", "longitude"), cds(fields[k]),
             {"units": get_channel(f"{k}500").units, "long_name": get_channel(f"{k}500").long_name.split(" at ")[0]})
         for k in ("u", "v", "t", "z")},
        coords={**coords, "pressure_level": ("pressure_level", np.asarray(plev, np.float64), {"units": "hPa"})},
        attrs=attrs)
    enc_t = {"valid_time": {"units": "seconds since 1970-01-01", "dtype": "int64"}}
    paths = []
    for ds, kind in ((sfc, "single_levels"), (pl, "pressure_levels")):
        p = nc_dir / f"world_{year}_{kind}.nc"
        enc = {k: {"dtype": "float32", "zlib": True, "complevel": 1} for k in ds.data_vars}
        ds.to_netcdf(p, engine="netcdf4", encoding={**enc, **enc_t})
        paths.append(str(p))
    return paths


def generate_world(nc_dir: str | os.PathLike, spec: WorldSpec = WorldSpec(), *, progress: bool = True) -> list[str]:
    """Run the model and write CDS-style netCDF files into ``nc_dir``.

    Deterministic for a given spec on a given platform (fixed seed, fixed
    step, no data-dependent control flow). Written to a temporary directory and
    renamed when complete. Returns the file paths.
    """
    import jax
    from tqdm.auto import tqdm

    nc_dir = Path(nc_dir)
    tmp = nc_dir.parent / f".{nc_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        run_chunk, spin, diagnose_one, state, chunk_days, lat, lon, _ = _build(spec)
        n_spin = -(-spec.spinup_days // chunk_days)
        n_chunks = -(-spec.days // chunk_days)
        with tqdm(total=n_spin + n_chunks, desc="world: simulate", unit="10 days", disable=not progress,
                  leave=False) as bar:
            for _ in range(n_spin):
                state = spin(state)
                bar.update(1)
            before = jax.tree.map(np.asarray, diagnose_one(state))
            pieces: list[dict[str, np.ndarray]] = []
            for _ in range(n_chunks):
                state, traj = run_chunk(state)
                pieces.append(jax.tree.map(np.asarray, traj))
                bar.update(1)
        n = 4 * spec.days
        fields = {k: np.concatenate([p[k] for p in pieces])[:n] for k in pieces[0]}
        bad = [k for k, x in fields.items() if not np.isfinite(x).all()]
        if bad:
            raise RuntimeError(f"world simulation went unstable (non-finite {bad}); reduce dt_minutes")
        # diagnosed after the run, in NumPy: seconds for years of 32 x 64 fields
        fields["tp"] = _precip_from_fields(fields, before, spec.levels, lat, lon)
        times = np.datetime64(spec.start, "ns") + np.arange(n) * np.timedelta64(6, "h").astype("timedelta64[ns]")
        years = times.astype("datetime64[Y]").astype(np.int64) + 1970
        paths = []
        for y in np.unique(years):
            m = years == y
            paths += _write_year(tmp, int(y), times[m], {k: x[m] for k, x in fields.items()}, lat, lon,
                                 spec.levels, spec)
        if nc_dir.exists():
            shutil.rmtree(nc_dir)
        os.rename(tmp, nc_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [str(nc_dir / os.path.basename(p)) for p in paths]


def _to_store_layout(fields: dict[str, np.ndarray], channels, levels) -> np.ndarray:
    """Diagnostics ``{name: [..., (level,) lon, lat ascending]}`` -> ``[..., lat north first, lon, channel]``."""
    plev = sorted(levels)
    out = []
    for c in channels:
        name = c if c in fields else c.rstrip("0123456789")
        x = fields[name] if name == c else fields[name][..., plev.index(int(c[len(name):])), :, :]
        out.append(np.swapaxes(np.asarray(x), -1, -2)[..., ::-1, :])
    return np.stack(out, axis=-1).astype(np.float32)


def twin_forecasts(spec: WorldSpec, init_times, steps: int, channels, *, perturbation_k: float = 0.1, seed: int = 0,
                   truth=None, check_tolerance: float = 0.02, progress: bool = True, drift: list | None = None):
    """The world forecast by its own dynamical core: ``(ic index, fields [steps + 1, lat, lon, channel])``.

    The world is simulated again from its spin-up, exactly as :func:`generate_world`
    did (same spec, same compiled chunks), up to each initial time; there its
    state's temperature gets Gaussian noise of ``perturbation_k`` kelvin at every
    grid point and model level (``fold_in(seed, ic)``), and the model runs
    ``steps`` 6-hour steps. Lead 0 is the perturbed state. What the twin misses
    at a lead is the world's own predictability from an almost perfect initial
    state: the ceiling a learned model of the world can approach.

    ``truth``: a callable ``(time index) -> [lat, lon, channel]`` of the stored
    world (its store); the re-simulation is checked against it at every
    initial time (RMS difference / the field's spatial std, worst channel, <=
    ``check_tolerance``) and refused when it drifted (another jax version can
    change the last bits, and years of chaos make them large); ``drift``, when
    a list, receives that figure for every initial time. ``init_times`` must be output times
    of the world, in any order.
    """
    import jax
    import jax.numpy as jnp
    from dinosaur import time_integration
    from tqdm.auto import tqdm

    run_chunk, spin, diagnose_one, state, chunk_days, lat, lon, (step, inner, batched_diagnose, grid) = _build(spec)
    t0 = np.datetime64(spec.start, "ns")
    idx = np.asarray((np.asarray(init_times, "datetime64[ns]") - t0) // np.timedelta64(6, "h"), np.int64)
    if perturbation_k < 0:
        raise DataError(f"twin: the perturbation must be >= 0 K, got {perturbation_k}")
    if np.any(idx < 0) or np.any(idx >= 4 * spec.days) or np.any(
            t0 + idx * np.timedelta64(6, "h") != np.asarray(init_times, "datetime64[ns]")):
        raise DataError(f"twin: initial times must be 6-hourly output times of the world ({spec.start} .. "
                        f"{spec.days} days), got {np.asarray(init_times)}")
    per_chunk = 4 * chunk_days
    drift = [] if drift is None else drift
    advance6h = jax.jit(time_integration.repeated(step, inner))

    @functools.partial(jax.jit, static_argnums=1)
    def forecast(s, n):
        _, states = time_integration.trajectory_from_step(step, outer_steps=n, inner_steps=inner,
                                                          start_with_input=True)(s)
        return batched_diagnose(states)

    @jax.jit
    def perturb(s, key):
        noise = perturbation_k / float(_to_si_temperature()) * jax.random.normal(
            key, grid.to_nodal(s.temperature_variation).shape, jnp.float32)
        return s.replace(temperature_variation=s.temperature_variation + grid.to_modal(noise))

    n_spin = -(-spec.spinup_days // chunk_days)
    order = np.argsort(idx)
    with tqdm(total=n_spin + int(idx.max()) // per_chunk + 1, desc="twin: simulate", unit="10 days",
              disable=not progress, leave=False) as bar:
        for _ in range(n_spin):
            state = spin(state)
            bar.update(1)
        chunk = 0
        key = jax.random.key(seed)
        for i in order:
            k = int(idx[i])
            while (chunk + 1) * per_chunk <= k:  # whole chunks: the generator's own compiled chunk
                state, _ = run_chunk(state)
                chunk += 1
                bar.update(1)
            s = state
            for _ in range(k - chunk * per_chunk + 1):  # output k is the state after k + 1 six-hour steps
                s = advance6h(s)
            if truth is not None:
                ref = np.asarray(truth(k), np.float32)
                got = _to_store_layout(jax.tree.map(np.asarray, diagnose_one(s)),
                                       channels, spec.levels)
                # RMS difference over the grid relative to each channel's spatial std, the worst channel: the
                # last-bit differences of another compiled path within a 10-day chunk grow to ~1e-4; another
                # world (years of chaos from other bits) is O(1)
                err = float(np.max(np.sqrt(np.mean((got - ref) ** 2, axis=(0, 1))) / (ref.std(axis=(0, 1)) + 1e-12)))
                drift.append(err)
                if err > check_tolerance:
                    raise DataError(
                        f"twin: the world re-simulated on this jax ({jax.__version__}) is not the stored world at "
                        f"{init_times[i]} (RMS diff / std {err:.3g} > {check_tolerance:g}); regenerate the "
                        f"world with this jax (python -m fcn_jax.world --out NEW_DIR) and score against it")
            fields = forecast(perturb(s, jax.random.fold_in(key, int(i))), steps + 1)
            yield int(i), _to_store_layout(jax.tree.map(np.asarray, fields), channels, spec.levels)


def _to_si_temperature() -> float:
    from dinosaur import primitive_equations, scales

    return primitive_equations.PrimitiveEquationsSpecs.from_si().dimensionalize(1.0, scales.units.degK).m


def persistence_skill(store: str | os.PathLike, years=None, max_lead: int = 20,
                      channels=None) -> dict[str, np.ndarray]:
    """Normalised RMSE of persistence and of climatology per lead (6 h steps).

    For each lead L (1..max_lead) and channel: RMSE(x[t+L] - x[t]) divided by
    RMSE(x[t+L] - time_mean). Climatology therefore scores 1 at every lead;
    persistence starts near 0 and tends to sqrt(2) once the state decorrelates.
    ``channels``: names to score (default: all of the store's; the table in the
    module docstring is over :data:`~fcn_jax.data.channels.WORLD`).
    Returns {'lead_hours': [L], 'persistence': [L, C], 'channels': [C]}.
    """
    from fcn_jax.data.store import open_store

    ds = open_store(store)
    if channels is not None:
        ds = ds.sel(channel=list(channels))
    if years is not None:
        ds = ds.sel(time=np.isin(ds["time"].dt.year, list(years)))
    x = ds["fields"].values.astype(np.float64)  # x: [time, channel, lat, lon]
    clim = ds["time_mean"].values.astype(np.float64)
    out = np.zeros((max_lead, x.shape[1]))
    for lead in range(1, max_lead + 1):
        pers = np.sqrt(((x[lead:] - x[:-lead]) ** 2).mean(axis=(0, 2, 3)))
        cl = np.sqrt(((x[lead:] - clim[None]) ** 2).mean(axis=(0, 2, 3)))
        out[lead - 1] = pers / cl
    step = float(ds.attrs.get("time_step_hours", 6.0))
    return {"lead_hours": np.arange(1, max_lead + 1) * step, "persistence": out,
            "channels": np.asarray(ds["channel"].values)}

