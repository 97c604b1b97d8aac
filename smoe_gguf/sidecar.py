"""NumPy files kept beside a profile (the route fits, the token memo): named after it, stamped
with their format, the model's identity and its expert count, and read whole or not at all."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .safeio import replace_atomically

T = TypeVar("T")


@dataclass(frozen=True)
class Sidecar:
    """One kind of file beside a profile, and the words its warnings use for it."""

    suffix: str  # added to the profile's name
    format: str  # the stamp that says what the file holds
    what: str  # what the warnings call it ("route fits")
    kind: str  # what a file of another format is said not to be ("route-fit")
    plural: bool  # ``what`` takes a plural verb

    def path(self, profile: Path) -> Path:
        return profile.with_name(profile.name + self.suffix)

    def load(self, path: Path, model_id: str, n_expert: int, max_bytes: int,
             parse: Callable[[Any], T], warn: Callable[[str], None]) -> T | None:
        """``parse`` of the arrays at ``path`` (a mapping of names to arrays, read while it runs).
        None where there is no file, or (with a warning) where it is another model's, larger than
        ``max_bytes``, not of this format, or unreadable, or ``parse`` raises ValueError, KeyError
        or TypeError."""
        if not path.is_file():
            return None
        it = "them" if self.plural else "it"
        try:
            if path.stat().st_size > max_bytes:
                raise ValueError("too large")
            with np.load(path, allow_pickle=False) as z:
                if str(z["format"]) != self.format:
                    raise ValueError(f"not a {self.kind} file")
                if str(z["model"]) != model_id or int(z["n_expert"]) != n_expert:
                    warn(f"{self.what} {path} {'belong' if self.plural else 'belongs'} to another model; ignoring {it}")
                    return None
                return parse(z)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:
            are, replace = ("are", "new ones replace them") if self.plural else ("is", "a new one replaces it")
            warn(f"{self.what} {path} {are} unreadable ({str(e)[:120]}); ignoring {it}, {replace}")
            return None

    def write(self, path: Path, model_id: str, n_expert: int, arrays: dict[str, np.ndarray]) -> None:
        """Write ``arrays`` under the stamp, atomically (the caller holds the profile's lock)."""
        stamped = {"format": np.array(self.format), "model": np.array(model_id), "n_expert": np.array(n_expert),
                   **arrays}
        replace_atomically(path, lambda f: np.savez(f, **stamped))
