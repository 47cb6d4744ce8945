"""Which precision ``auto`` means on a CPU: native bf16 only where the instructions exist."""

import platform
from pathlib import Path

import pytest
import torch

from benchmarks.record import cpu_fields
from recsys import hardware


def _cpuinfo_flags() -> set[str] | None:
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine().lower() not in hardware._X86 or not cpuinfo.is_file():
        return None
    flags = cpu_fields(cpuinfo.read_text()).get("flags")
    return None if flags is None else set(flags.split())


def test_native_bf16_on_this_machine_matches_its_cpu_flags():
    flags = _cpuinfo_flags()
    if flags is None:
        pytest.skip("needs an x86 Linux machine, whose /proc/cpuinfo lists the CPU's flags")
    assert hardware.cpu_supports_bf16() is bool({"avx512_bf16", "amx_bf16"} & flags)
    if "avx512f" in flags and not {"avx512_bf16", "amx_bf16"} & flags:
        assert hardware.resolve_precision("auto", "cpu") == "fp32"  # an AVX-512 core without bf16


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True),
                                                        (False, True, True)])
def test_on_x86_the_isa_flags_decide_not_onednns_probe(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    # oneDNN says yes on every AVX-512 core, where its bf16 is converted through fp32
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert hardware.cpu_supports_bf16() is expected
    assert hardware.resolve_precision("auto", "cpu") == ("bf16" if expected else "fp32")


def test_an_x86_torch_without_the_flag_probes_cannot_tell_and_auto_takes_fp32(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert hardware.cpu_supports_bf16() is None
    assert hardware.resolve_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize("native", [True, False])
def test_on_arm_onednns_probe_decides(monkeypatch, native):
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native, raising=False)
    assert hardware.cpu_supports_bf16() is native
