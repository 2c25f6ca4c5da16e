"""How long and how hard a run goes: full (the default), ``--quick`` or ``--smoke``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

T = TypeVar("T")

Mode = Literal["full", "quick", "smoke"]


@dataclass(frozen=True)
class Settings:
    mode: Mode
    workdir: Path  # a temporary directory, removed after the run

    def pick(self, full: T, quick: T, smoke: T) -> T:
        """The value for this run's mode."""
        return {"full": full, "quick": quick, "smoke": smoke}[self.mode]

    @property
    def smoke(self) -> bool:
        """Tiny counts, the Python HTTP client instead of wrk, targets not judged."""
        return self.mode == "smoke"
