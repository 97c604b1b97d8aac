"""smoe-gguf: page the routed experts of a MoE GGUF through a byte-budgeted X-Slot, bit-exact."""

import os

# numpy's BLAS serves the runtime small solves only (smoe_gguf.route_fit), between llama.cpp's
# matmuls: its worker threads would spin on the cores llama.cpp computes on. Set before numpy
# loads it; a user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
