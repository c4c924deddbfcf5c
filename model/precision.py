"""The numbers a forward pass runs in: :class:`Precision`, without importing torch.

Kept apart from :mod:`model.inference` so that settings and the worker's
configuration can name and check a precision without loading torch.

``auto`` is float32 on the CPU, the numbers the model was validated in, and
float16 autocast on CUDA, the GPU's fast path. ``bfloat16`` on the CPU is an
opt-in for hosts whose cores compute in bfloat16 natively (AVX512-BF16 or
AMX): there the model's stage takes about two thirds of float32's CPU time,
and the calibrated probabilities move by a few thousandths (``bench/stages.py
--precision bfloat16 --agreement N`` measures both). The precision a result
was computed in is recorded with it (:attr:`model.inference.ModelInfo.precision`,
and the SR's algorithm parameters).
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Precision"]


class Precision(str, Enum):
    """How the forward pass computes: as validated, or under ``torch.autocast``."""

    AUTO = "auto"
    """float16 autocast on CUDA, float32 elsewhere."""
    FLOAT32 = "float32"
    """Plain float32 on any device: the numbers the model was validated in."""
    FLOAT16 = "float16"
    """float16 autocast on any device (how the GPU path runs on a CPU, in tests)."""
    BFLOAT16 = "bfloat16"
    """bfloat16 autocast on any device: fast on CPUs with AVX512-BF16 or AMX."""

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        """``value`` as a :class:`Precision` (case and surrounding spaces ignored).

        Raises:
            ValueError: ``value`` names none of them (the message lists them).
        """
        if isinstance(value, Precision):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ValueError(f"precision must be one of {names}, not {value!r}") from None
