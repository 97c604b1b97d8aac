"""Quantize a GGUF with llama.cpp's own ``llama_model_quantize``."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp

from smoe_gguf.errors import SmoeError
from smoe_gguf.llama_session import LOG

# "q4_k" is Q4_K_S: every expert tensor of a model with fewer than 8 layers is Q4_K. Q4_K_S
# still makes the first n_layer/8 layers' ffn_down Q5_K, and output.weight is Q6_K.
# "q4_k_m" is Q4_K_M, the mix published GGUFs use: gate/up Q4_K, and the down part Q6_K in
# some layers (llama.cpp's use_more_bits: the first and last eighth, every third between).
# "iq4_xs" needs no importance matrix. "mxfp4" is MXFP4_MOE: MXFP4 experts, Q8_0 elsewhere.
FTYPES: dict[str, int] = {
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "iq4_xs": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS,
    "mxfp4": llama_cpp.LLAMA_FTYPE_MOSTLY_MXFP4_MOE,
}


def quantize(src: Path, dst: Path, ftype: str, n_threads: int = 2) -> None:
    """Quantize ``src`` (F32/F16 GGUF) into ``dst``; raise SmoeError on failure."""
    if ftype not in FTYPES:
        raise SmoeError(f"unknown quantization {ftype!r}; choose one of {', '.join(FTYPES)}")
    if not Path(src).is_file():
        raise SmoeError(f"cannot quantize {src}: no such file")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = n_threads
    LOG.install()
    LOG.clear()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SmoeError(f"llama.cpp could not quantize {src} to {ftype}: {LOG.reason() or f'error {rc}'}")
