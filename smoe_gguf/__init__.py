"""smoe-gguf: page the routed experts of a MoE GGUF through a byte-budgeted X-Slot, bit-exact."""

import os

from . import spin

# numpy's BLAS serves the runtime small solves only (smoe_gguf.route_fit), between llama.cpp's
# matmuls: its worker threads would spin on the cores llama.cpp computes on. Set before numpy
# loads it; a user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# llama.cpp's OpenMP spin (smoe_gguf.spin): shortened for paging unless the user set it; the run
# commands choose by budget before llama.cpp loads.
spin.set_default()

__version__ = "0.1.0"
