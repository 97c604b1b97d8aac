"""smoe-gguf: page the routed experts of a MoE GGUF through a byte-budgeted X-Slot, bit-exact."""

import os

# numpy's BLAS serves the runtime small solves only (smoe_gguf.route_fit), between llama.cpp's
# matmuls: its worker threads would spin on the cores llama.cpp computes on. Set before numpy
# loads it; a user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# llama.cpp's OpenMP threads (libgomp) spin this many rounds before they sleep between graph
# pieces (libgomp's own default, where OMP_WAIT_POLICY is unset, is LIBGOMP_SPINCOUNT, about 30
# times as long): while a gate waits on the disk, the other compute threads stop burning the cores
# the readers and the observers need. Set before llama.cpp loads libgomp; a user's own setting wins.
GOMP_SPINCOUNT = "10000"
LIBGOMP_SPINCOUNT = "300000"
GOMP_SPINCOUNT_FROM_USER = "GOMP_SPINCOUNT" in os.environ
os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)

__version__ = "0.1.0"
