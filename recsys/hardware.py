"""What the machine can do natively: which precision ``auto`` means here, and warnings where a
setting would run emulated."""

from __future__ import annotations

# torch is imported inside the functions: importing this module (the encoder does) costs nothing


def cpu_supports_bf16() -> bool | None:
    """Whether this CPU runs bf16 natively; None if this torch cannot tell. Without it, bf16 is
    emulated: on an AVX2-only EPYC a TIGER training step's backward took 10.3 s under bf16 autocast
    against 0.6 s in fp32 (docs/BENCHMARKS.md).

    On x86 that means AVX-512 BF16 or AMX, read from the CPU's feature flags. oneDNN's own probe
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) is not asked there: it says yes on any
    AVX-512 core, where bf16 matmuls are converted to fp32 and back (an Ice Lake Xeon: bf16 62
    GFLOP/s against fp32 292, docs/experiments/precision.md). On other CPUs (Arm) that probe checks
    the bf16 instructions themselves."""
    import platform

    import torch

    if platform.machine().lower() in _X86:
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        if avx512_bf16 is None or amx is None:
            return None
        return bool(avx512_bf16() or amx())
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return None if probe is None else bool(probe())


_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


def emulated_bf16_warning(setting: str) -> str:
    return (f"{setting}=bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX): it is emulated and "
            f"can be many times slower than fp32; set {setting}=fp32 on this machine")


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 where ``device`` (cpu or cuda) runs it natively, else fp32; fp32 and bf16 are
    kept. On a CPU whose bf16 support torch cannot tell, fp32. Used for the encoder's weights and for
    training's autocast alike, and resolved where a stage starts, so a run records what it used."""
    if precision != "auto":
        return precision
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() is True else "fp32"
