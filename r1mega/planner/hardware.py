"""Hardware figures and efficiency assumptions behind the planner's step-time estimate.

Every number the estimate depends on is here, printed with the plan, so a reader can
judge (or override) it instead of trusting an opaque total.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One GPU and its links. Defaults: NVIDIA H100 SXM 80GB in an 8-GPU HGX node with
    one 400 Gb/s InfiniBand NIC per GPU (datasheet figures, dense, no sparsity)."""

    name: str = "H100 SXM"
    bf16_flops: float = 989e12
    fp8_flops: float = 1979e12
    hbm_bytes_per_s: float = 3.35e12
    nvlink_bytes_per_s: float = 450e9  # per direction per GPU (NVLink 4, 900 GB/s total)
    ib_bytes_per_s: float = 50e9  # per GPU: 400 Gb/s NDR
    pcie_bytes_per_s: float = 50e9  # host link per direction (Gen5 x16, ~64 GB/s raw)

    def peak_flops(self, fp8: bool) -> float:
        return self.fp8_flops if fp8 else self.bf16_flops


@dataclass(frozen=True)
class Assumptions:
    """Efficiencies and constants that turn byte and FLOP counts into seconds and GiB.

    Training MFU defaults: 0.35 of the bf16 peak is what well-tuned Megatron MoE runs
    reach; with FP8 GEMMs 0.20 of the FP8 peak is DeepSeek-V3's own pre-training rate
    (14.8T tokens in 2.664M H800 GPU-hours = ~1540 tokens/s/GPU at ~250 GFLOP/token).
    """

    train_mfu_bf16: float = 0.35
    train_mfu_fp8: float = 0.20
    prefill_mfu: float = 0.40
    decode_hbm_efficiency: float = 0.60  # achieved / peak HBM bandwidth when decoding
    link_efficiency: float = 0.80  # achieved / peak NVLink and IB bandwidth
    nvlink_latency_s: float = 15e-6  # one small intra-node collective
    ib_latency_s: float = 40e-6  # one small inter-node collective / all-to-all
    runtime_reserve_gib: float = 4.0  # CUDA context, NCCL buffers, workspaces, slack

    def train_mfu(self, fp8: bool) -> float:
        return self.train_mfu_fp8 if fp8 else self.train_mfu_bf16
