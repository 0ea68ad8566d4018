"""Chip peaks used by every benchmark and by MFU: one table, one place.

Numbers are vendor datasheet values (see ../shared/docs/performance-model.md §5): dense bf16 FLOP/s,
HBM bandwidth in bytes/s and HBM capacity in bytes per chip.
"""
import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class ChipPeak:
    name: str
    bf16_flops: float
    hbm_bytes_per_s: float
    hbm_bytes: float


_T = 1e12
_G = 1e9
_GIB = 2**30
PEAKS: dict[str, ChipPeak] = {
    "tpu-v5e": ChipPeak("TPU v5e", 197 * _T, 819 * _G, 16 * _G),
    "tpu-v5p": ChipPeak("TPU v5p", 459 * _T, 2765 * _G, 95 * _GIB),
    "tpu-v6e": ChipPeak("TPU v6e", 918 * _T, 1640 * _G, 32 * _G),
    "tpu7x": ChipPeak("TPU7x Ironwood", 2307 * _T, 7380 * _G, 192 * _GIB),
    "h100": ChipPeak("NVIDIA H100 SXM", 989 * _T, 3350 * _G, 80 * _G),
    "h200": ChipPeak("NVIDIA H200", 989 * _T, 4800 * _G, 141 * _G),
    "b200": ChipPeak("NVIDIA B200", 2250 * _T, 8000 * _G, 180 * _G),
}


def detect_chip(device: jax.Device | None = None) -> ChipPeak | None:
    """The peak entry for `device` (default: the first device), or None on CPU or an unknown chip."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    if device.platform == "cpu":
        return None
    for key, needle in [("tpu7x", "7x"), ("tpu7x", "ironwood"), ("tpu-v6e", "v6"), ("tpu-v5p", "v5p"),
                        ("tpu-v5e", "v5 lite"), ("tpu-v5e", "v5e"), ("h200", "h200"), ("h100", "h100"),
                        ("b200", "b200")]:
        if needle in kind:
            return PEAKS[key]
    return None
