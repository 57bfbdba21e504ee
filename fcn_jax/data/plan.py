"""What a ``prepare`` will write, before it writes: sizes, time, disk space.

:func:`make_plan` sizes every output (fields, statistics, climatologies) and
the scratch space from the source's shape alone -- nothing is read -- and
estimates the time at a nominal disk rate; ``prepare`` prints the plan and
refuses (:class:`~fcn_jax.data.errors.DataError`) when the free space of the
target's file system cannot hold what remains to be written. Sizes are
uncompressed upper bounds (lz4 on float32 weather fields saves little).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from fcn_jax.data.stats import N_DOY

#: Nominal sustained rate (bytes/s) of reading the source plus writing the store, for the estimate
#: before anything is read; the progress bar's ETA then uses the measured rate.
NOMINAL_BYTES_PER_S = 200e6


def human(n: float) -> str:
    """Bytes as a short human-readable string (powers of 1024)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@dataclasses.dataclass
class PreparePlan:
    """Sizes (bytes) of everything a prepare writes; see :meth:`format`."""

    store: str
    shape: tuple[int, int, int, int]  # fields [time, channel, lat, lon]
    channels: list[str]
    years: list[int]
    stats_years: list[int]
    stats_steps: int
    climatology: str  # time-mean | doy-hour | import
    climatology_reason: str
    clim_hours: int
    fields_bytes: int
    stats_bytes: int
    time_mean_bytes: int
    clim_bytes: int
    clim_scratch_bytes: int
    checkpoint_bytes: int
    done_steps: int = 0  # already written by an interrupted run
    free_bytes: int | None = None

    @property
    def remaining_fraction(self) -> float:
        return 1.0 - self.done_steps / max(self.shape[0], 1)

    @property
    def output_bytes(self) -> int:
        return self.fields_bytes + self.stats_bytes + self.time_mean_bytes + self.clim_bytes

    @property
    def peak_bytes(self) -> int:
        """Disk needed at the peak: the store plus the scratch, before the scratch is removed."""
        return self.output_bytes + self.clim_scratch_bytes + 2 * self.checkpoint_bytes

    @property
    def needed_bytes(self) -> int:
        """What remains to be written (an interrupted run has written part of the fields)."""
        written = int(self.fields_bytes * (self.done_steps / max(self.shape[0], 1)))
        return self.peak_bytes - written

    @property
    def clim_io_bytes(self) -> int:
        """Climatology I/O: each statistics step reads and rewrites its slot (2 x the step), then the
        smoothing reads the scratch and writes the output once."""
        if self.climatology != "doy-hour":
            return 2 * self.clim_bytes if self.climatology == "import" else 0
        step = self.fields_bytes // max(self.shape[0], 1)
        return 2 * step * self.stats_steps + self.clim_scratch_bytes + self.clim_bytes

    @property
    def estimate_seconds(self) -> float:
        """Read the source once and write the store once (what remains of it), plus the climatology I/O."""
        f = self.remaining_fraction
        return (2 * self.fields_bytes * f + self.clim_io_bytes) / NOMINAL_BYTES_PER_S

    def format(self) -> str:
        t, c, h, w = self.shape
        lines = [
            f"plan for {self.store}:",
            f"  fields      [time={t}, channel={c}, lat={h}, lon={w}] float32   {human(self.fields_bytes):>10}",
            f"  statistics  mean/std [{c}] float64                          {human(self.stats_bytes):>10}",
            f"  time_mean   [{c}, {h}, {w}] float32                        {human(self.time_mean_bytes):>10}",
        ]
        if self.climatology != "time-mean":
            lines.append(f"  clim_doy_hour [{N_DOY}, {self.clim_hours}, {c}, {h}, {w}] float32   "
                         f"{human(self.clim_bytes):>10}")
        lines.append(f"  climatology: {self.climatology} ({self.climatology_reason})")
        if self.clim_scratch_bytes:
            lines.append(f"  scratch: climatology slots {human(self.clim_scratch_bytes)} (= its output size), "
                         f"checkpoints {human(2 * self.checkpoint_bytes)}; removed at the end")
        lines.append(f"  years {self.years[0]}..{self.years[-1]} ({len(self.years)}), statistics from "
                     f"{len(self.stats_years)} year(s), {self.stats_steps} steps")
        lines.append(f"  total on disk at the peak: {human(self.peak_bytes)} (uncompressed upper bound)")
        if self.done_steps:
            lines.append(f"  resuming: {self.done_steps}/{t} steps already written")
        lines.append(f"  estimated time: {_duration(self.estimate_seconds)} at a nominal "
                     f"{NOMINAL_BYTES_PER_S / 1e6:.0f} MB/s (the progress bar's ETA is measured)")
        if self.free_bytes is not None:
            lines.append(f"  free space: {human(self.free_bytes)}")
        return "\n".join(lines)

    def check_disk(self, target: Path) -> None:
        """Raise DataError when the free space at ``target``'s file system is too small."""
        from fcn_jax.data.errors import DataError

        probe = Path(target).resolve().parent
        while not probe.exists():
            probe = probe.parent
        self.free_bytes = int(shutil.disk_usage(probe).free)
        if self.needed_bytes > self.free_bytes:
            hints = ["free space or write elsewhere (--out)", "prepare fewer --years or --channels"]
            if self.climatology == "doy-hour":
                hints.append(f"--climatology time-mean (saves {human(self.clim_bytes + self.clim_scratch_bytes)})")
            raise DataError(
                f"{self.store}: not enough disk space: this prepare needs {human(self.needed_bytes)} "
                f"(fields {human(self.fields_bytes)}, climatology {human(self.clim_bytes)}, scratch "
                f"{human(self.clim_scratch_bytes + 2 * self.checkpoint_bytes)}) but {probe} has "
                f"{human(self.free_bytes)} free; " + "; ".join(hints))


def make_plan(store: str, shape: tuple[int, int, int, int], channels: list[str], years: list[int],
              stats_years: list[int], stats_steps: int, climatology: str, reason: str,
              clim_hours: int) -> PreparePlan:
    """Sizes from shapes only (see the module docstring)."""
    t, c, h, w = shape
    step = c * h * w * 4
    clim = N_DOY * clim_hours * step if climatology != "time-mean" else 0
    return PreparePlan(
        store=store, shape=shape, channels=channels, years=years, stats_years=stats_years,
        stats_steps=stats_steps, climatology=climatology, climatology_reason=reason, clim_hours=clim_hours,
        fields_bytes=t * step, stats_bytes=2 * c * 8, time_mean_bytes=step, clim_bytes=clim,
        clim_scratch_bytes=(clim + N_DOY * clim_hours * 16) if climatology == "doy-hour" else 0,
        checkpoint_bytes=2 * step,  # the float64 time-mean sum
    )
