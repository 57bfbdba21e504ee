"""Performance model of fcn_jax: analytic FLOPs, memory, communication and time.

``python -m fcn_jax.perf --experiment NAME [--mesh D,C,H,W] [--set key=value ...]
[--hardware NAME] [--json]``. Modules: :mod:`.hardware` (peaks and links),
:mod:`.layouts` (spectral layouts as pluggable terms), :mod:`.model` (work,
memory and time per device), :mod:`.predict` (one prediction, mesh search),
:mod:`.compiler` (what XLA says, for the tests and bench scripts),
:mod:`.report` (the seed table and the time-to-solution figure).
"""

from fcn_jax.perfmodel.hardware import HARDWARE, Hardware, get_hardware
from fcn_jax.perfmodel.predict import cheapest_fitting, predict

__all__ = ["HARDWARE", "Hardware", "cheapest_fitting", "get_hardware", "predict"]
