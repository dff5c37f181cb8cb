"""Peak figures of known accelerators, and quick measurements where none is known.

MFU and roofline numbers are only as good as the peak they divide by, so the peaks are
stated here, per device, from the vendors' datasheets: dense tensor-core throughput (no
structured sparsity) and HBM bandwidth. A device is recognised from
``torch.cuda.get_device_name()``; anything else (a CPU, an unlisted GPU) gets a measured
figure, labelled as such, or one passed on the command line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["KNOWN_DEVICES", "DeviceSpec", "lookup_device", "measure_copy_bandwidth",
           "measure_matmul_flops"]


@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet peaks of one accelerator (dense, no sparsity)."""

    name: str
    bf16_tflops: float
    fp8_tflops: float | None  # None: no FP8 tensor cores
    hbm_gbs: float  # GB/s (1e9 bytes)

    def peak_flops(self, fp8: bool) -> float:
        if fp8 and self.fp8_tflops is None:
            raise ValueError(f"{self.name} has no FP8 tensor cores")
        return (self.fp8_tflops if fp8 else self.bf16_tflops) * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbs * 1e9


# (substrings that must all occur in the device name, spec). First match wins, so the
# more specific names come first ("GH200" contains "H200", "H100 PCIe" contains "H100").
KNOWN_DEVICES: tuple[tuple[tuple[str, ...], DeviceSpec], ...] = (
    (("GH200",), DeviceSpec("GH200 (H100 96GB HBM3)", 989, 1979, 4000)),
    (("H200",), DeviceSpec("H200", 989, 1979, 4800)),
    (("H100", "PCIe"), DeviceSpec("H100 PCIe", 756, 1513, 2000)),
    (("H100", "NVL"), DeviceSpec("H100 NVL", 835, 1671, 3900)),
    (("H100",), DeviceSpec("H100 SXM", 989, 1979, 3350)),
    (("H800",), DeviceSpec("H800 SXM", 989, 1979, 3350)),
    (("H20",), DeviceSpec("H20", 148, 296, 4000)),
    (("B200",), DeviceSpec("B200", 2250, 4500, 8000)),
    (("A100", "PCIe", "80GB"), DeviceSpec("A100 PCIe 80GB", 312, None, 1935)),
    (("A100", "80GB"), DeviceSpec("A100 SXM 80GB", 312, None, 2039)),
    (("A100",), DeviceSpec("A100 40GB", 312, None, 1555)),
    (("L40S",), DeviceSpec("L40S", 362, 733, 864)),
)


def lookup_device(device_name: str) -> DeviceSpec | None:
    """The datasheet spec of ``device_name`` (as torch reports it), or None."""
    for needles, spec in KNOWN_DEVICES:
        if all(n in device_name for n in needles):
            return spec
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device | str = "cpu", megabytes: int = 64,
                           repeats: int = 5) -> float:
    """Achieved memory bandwidth in bytes/s: best of ``repeats`` copies of a
    ``megabytes`` buffer, counting the bytes read plus the bytes written."""
    device = torch.device(device)
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up (page faults, allocator)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         size: int = 1024, repeats: int = 5) -> float:
    """Achieved FLOP/s of a square ``size`` GEMM (best of ``repeats``): the practical peak
    of a device without a datasheet entry (a CPU)."""
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
