"""What the machine can do natively, for warnings where a setting would run emulated."""

from __future__ import annotations

import torch


def cpu_supports_bf16() -> bool | None:
    """Whether this CPU runs bf16 natively (AVX-512 BF16 or AMX, as oneDNN sees it); None if this
    torch cannot tell. Without it, bf16 is emulated: on an AVX2-only EPYC a TIGER training step's
    backward took 10.3 s under bf16 autocast against 0.6 s in fp32 (docs/BENCHMARKS.md)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return None if probe is None else bool(probe())


def emulated_bf16_warning(setting: str) -> str:
    return (f"{setting}=bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX): it is emulated and "
            f"can be many times slower than fp32; set {setting}=fp32 on this machine")
