"""smoe-gguf: page the routed experts of a MoE GGUF through a byte-budgeted X-Slot, bit-exact."""

__version__ = "0.1.0"
