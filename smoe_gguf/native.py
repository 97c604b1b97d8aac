"""The gate's native library (``_gatecb.c`` with ``_pager.c``), loaded with ctypes: one loader for
the gate, the pager and the X-Slot's lock, and the few small calls they share."""

from __future__ import annotations

import ctypes
import importlib.util
from ctypes import c_int32, c_size_t, c_uint8, c_void_p

from .errors import SmoeError

_LIB: ctypes.CDLL | None = None
_QUICK: ctypes.PyDLL | None = None


def load_extension(name: str, keep_gil: bool = False) -> ctypes.CDLL:
    """One of the package's extensions (``smoe_gguf.<name>``), loaded with ctypes: pip builds them
    as Python extensions only so that it compiles them. A call through it releases the GIL, unless
    ``keep_gil`` (for calls that return at once: releasing would hand the GIL to another thread
    and wait to get it back)."""
    spec = importlib.util.find_spec(f"smoe_gguf.{name}")
    if spec is None or spec.origin is None:
        raise SmoeError(f"smoe_gguf.{name} is not built: reinstall the package (`make install` or `pip install -e .`)")
    return ctypes.PyDLL(spec.origin) if keep_gil else ctypes.CDLL(spec.origin)


def check_sizeof(lb: ctypes.CDLL, name: str, size: int, mirror: str) -> None:
    """Raise unless the C struct ``name`` of library ``lb`` has ``size`` bytes (its ctypes mirror
    in ``mirror``)."""
    sizeof = getattr(lb, f"smoe_{name}_sizeof")
    sizeof.restype = c_size_t
    if sizeof() != size:
        raise SmoeError(f"{lb._name} does not match {mirror} (struct {name} of {sizeof()} bytes, "
                        f"expected {size}): rebuild the package")


def function_address(fn: object) -> int:
    """The address of a native function (a ctypes symbol), for a callback slot of llama.cpp/ggml."""
    address = ctypes.cast(fn, c_void_p).value
    assert address is not None
    return address


def lib() -> ctypes.CDLL:
    """The gate's library, loaded once (its struct sizes are checked by the modules that mirror them)."""
    global _LIB
    if _LIB is None:
        lb = load_extension("_gatecb")
        lb.smoe_lock_new.restype = c_void_p
        lb.smoe_lock_new.argtypes = []
        for name in ("smoe_lock_acquire", "smoe_lock_release", "smoe_lock_free"):
            getattr(lb, name).restype = None
            getattr(lb, name).argtypes = [c_void_p]
        lb.smoe_flight_new.restype = c_void_p
        lb.smoe_flight_new.argtypes = []
        lb.smoe_flight_free.restype = None
        lb.smoe_flight_free.argtypes = [c_void_p]
        _LIB = lb
    return _LIB


def quick() -> ctypes.PyDLL:
    """The gate's library for calls that never wait (the flight table's stores), which keep the GIL."""
    global _QUICK
    if _QUICK is None:
        lb = load_extension("_gatecb", keep_gil=True)
        lb.smoe_flight_store.restype = None
        lb.smoe_flight_store.argtypes = [c_void_p, c_void_p, c_uint8]
        lb.smoe_flight_start.restype = c_int32
        lb.smoe_flight_start.argtypes = [c_void_p]
        _QUICK = lb
    return _QUICK


class NativeLock:
    """A mutex that Python threads and the native pager share (a context manager). Waiting for it
    releases the GIL, so a thread holding it may run Python while another waits."""

    def __init__(self) -> None:
        self._lib = lib()
        self.address: int = self._lib.smoe_lock_new()
        if not self.address:
            raise SmoeError("could not allocate a lock")

    def __enter__(self) -> "NativeLock":
        self._lib.smoe_lock_acquire(self.address)
        return self

    def __exit__(self, *exc: object) -> None:
        self._lib.smoe_lock_release(self.address)

    def __del__(self) -> None:
        if getattr(self, "address", 0):
            self._lib.smoe_lock_free(self.address)
            self.address = 0


class FlightSignal:
    """The in-flight table's signal (``struct smoe_flight``): the native pager waits on it for a
    prefetch being read; every store through :meth:`store` wakes it to look again."""

    def __init__(self) -> None:
        self._lib = lib()
        self.address: int = self._lib.smoe_flight_new()
        if not self.address:
            raise SmoeError("could not allocate the flight signal")
        quick_lib = quick()
        self._store, self._start = quick_lib.smoe_flight_store, quick_lib.smoe_flight_start

    def store(self, flag: int, value: int) -> None:
        """The byte at address ``flag`` (a byte of fetcher.py's flight table) set to ``value`` as
        a release store, then the waiters woken: a thread that reads it with acquire (the pager)
        sees every write made before it (a prefetch marks its leaf resident, then not in flight)."""
        self._store(self.address, flag, value)

    def start(self, flag: int) -> bool:
        """Queued -> loading, atomically; False if the byte was not "queued" (the gate took it)."""
        return bool(self._start(flag))

    def __del__(self) -> None:
        if getattr(self, "address", 0):
            self._lib.smoe_flight_free(self.address)
            self.address = 0
