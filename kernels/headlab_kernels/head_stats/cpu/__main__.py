"""`python -m headlab_kernels.head_stats.cpu [-v]`: build the CPU fused kernel now (`make install` runs this)."""

import sys
from pathlib import Path

from headlab_kernels.head_stats.cpu import load, unavailable

mod = load(verbose="-v" in sys.argv)
if mod is None:
    print(f"headlab's CPU attention-statistics kernel is not built: {unavailable()}; "
          "the ATen-flash and torch routes will be used", file=sys.stderr)
else:
    print(f"headlab's CPU attention-statistics kernel is built in {Path(mod.__file__).parent}")
