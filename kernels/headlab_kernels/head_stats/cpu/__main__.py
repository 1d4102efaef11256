"""`python -m headlab_kernels.head_stats.cpu [-v]`: build the CPU fused kernel now (`make install` runs this)."""

import sys

from headlab_kernels.head_stats.cpu import build_dir, load, unavailable

if load(verbose="-v" in sys.argv) is None:
    print(f"headlab's CPU attention-statistics kernel is not built: {unavailable()}; "
          "the ATen-flash and torch routes will be used", file=sys.stderr)
else:
    print(f"headlab's CPU attention-statistics kernel is built in {build_dir()}")
