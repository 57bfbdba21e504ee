"""``python -m fcn_jax.prepare SOURCES... --out STORE``: a training store from ERA5 (or any supported source).

Reads CDS netCDF (new or legacy), WeatherBench 2 / ARCO zarr, FourCastNet HDF5
year files or GRIB, and writes a zarr store with ``fields[time, channel, lat,
lon]``, per-channel statistics and climatologies (:mod:`fcn_jax.data.prepare`).
Resumable: a run killed at any point continues from its last commit when
started again with the same arguments. ``python -m fcn_jax.prepare --info
STORE`` summarises a prepared store. The embedded world has its own command,
:mod:`fcn_jax.world`.
"""

from __future__ import annotations

import argparse
import sys
import time

from fcn_jax import cli


def _prepare(args: argparse.Namespace) -> None:
    from fcn_jax.data.prepare import prepare

    layout = None
    if args.hdf5_layout:
        layout = [None if n in ("-", "") else n for n in args.hdf5_layout.split(",")]
    clim = "time-mean" if args.no_doy_clim else args.climatology
    t0 = time.perf_counter()
    out = prepare(args.sources, args.out, channels=args.channels, years=args.years, stats_years=args.stats_years,
                  kind=args.kind, drop_south_pole=args.drop_south_pole, allow_gaps=args.allow_gaps,
                  climatology=clim, clim_window_days=args.clim_window_days,
                  overwrite=args.overwrite, lat_chunks=args.lat_chunks, compression=args.compression,
                  progress=not args.quiet, hdf5_layout=layout, readers=args.readers,
                  reader_processes=args.reader_processes, member=args.member, dry_run=args.dry_run,
                  log=lambda s: print(s, flush=True))
    if not args.dry_run:
        print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")


def _info(args: argparse.Namespace) -> None:
    from fcn_jax.data.store import open_store

    ds = open_store(args.info)
    print(ds)
    print("mean:", dict(zip(ds["channel"].values.tolist(), ds["mean"].values.round(4).tolist())))
    print("std: ", dict(zip(ds["channel"].values.tolist(), ds["std"].values.round(4).tolist())))


def build_parser() -> argparse.ArgumentParser:
    from fcn_jax.data.channels import CHANNEL_SETS

    p = cli.parser("prepare", __doc__)
    p.description = ("Read CDS netCDF (new or legacy), WeatherBench 2 / ARCO zarr, FourCastNet "
                                   "HDF5 year files or GRIB (ERA5, IFS open data, GFS; --member N picks one "
                                   "member of an ensemble) and write a zarr training store with fields[time, "
                                   "channel, lat, lon], per-channel mean/std and climatologies. Prints a plan (sizes, "
                                   "time) first and refuses when the disk is too small. Resumable: a run "
                                   "killed at any point continues from its last commit when started again "
                                   "with the same arguments. Sources may be fsspec URLs (gs://, s3://, "
                                   "https://) of zarr stores.")
    p.add_argument("sources", nargs="*", help="source files / zarr stores / directories (one format)")
    p.add_argument("--out", default=None, help="store path to write (e.g. era5.zarr)")
    p.add_argument("--channels", default="fcn20",
                   help=f"comma-separated channel names or a set name {sorted(CHANNEL_SETS)} (default fcn20)")
    p.add_argument("--years", default=None, help="years to keep, e.g. 1979-2015 or 2016,2017 (default all)")
    p.add_argument("--stats-years", default=None, help="years for statistics (default: all kept years)")
    p.add_argument("--kind", default="auto", choices=["auto", "cds", "wb2", "hdf5", "grib"],
                   help="source format (auto: from the names; a file starting with GRIB is GRIB)")
    p.add_argument("--member", type=int, default=None,
                   help="ensemble member (dimension / GRIB key 'number') to read from ensemble sources; "
                        "without it a source with several members is refused")
    p.add_argument("--drop-south-pole", action="store_true", help="drop the -90 row (721 -> 720 rows)")
    p.add_argument("--allow-gaps", action="store_true", help="accept gaps in the source time axis")
    p.add_argument("--climatology", default="auto",
                   help="auto (day-of-year x hour only when the statistics span >= 3 years, else the time "
                        "mean), time-mean, doy-hour, or the path/URL of a WeatherBench 2 climatology zarr "
                        "to import (regridded if needed)")
    p.add_argument("--no-doy-clim", action="store_true", help="same as --climatology time-mean")
    p.add_argument("--readers", type=int, default=4, help="reader threads or processes (default 4)")
    p.add_argument("--reader-processes", action="store_true",
                   help="read in processes (parallel netCDF/HDF5 decompression) rather than threads")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--clim-window-days", type=int, default=61, help="odd triangular window width (default 61)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store once the new one is done")
    p.add_argument("--lat-chunks", type=int, default=1, help="latitude bands per chunk (default 1: whole field)")
    p.add_argument("--compression", default="lz4", choices=["lz4", "zstd", "none"], help="chunk compression")
    p.add_argument("--hdf5-layout", default=None,
                   help="HDF5 channel axis as comma-separated names, '-' for unused (default: FourCastNet's 21)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--info", default=None, metavar="STORE", help="summarise a prepared store and stop")
    return p


def main(argv=None) -> int:
    ap = build_parser()
    args = cli.parse(ap, argv)
    if args.info is None and (not args.sources or args.out is None):
        ap.error("give SOURCES... --out STORE (or --info STORE)")
    return cli.run(lambda: (_info if args.info else _prepare)(args))


if __name__ == "__main__":
    sys.exit(main())
