"""Pick the device and mixed precision with no code change: a GPU when present (bf16 where the GPU computes it
natively, compute capability 8.0 and up; else fp16 autocast with loss scaling; fp32 matmuls in TF32 where the GPU
has it); on the CPU bf16 autocast where the CPU computes bf16 natively (AMX or AVX512-BF16: measured 1.27x a step with AMX and
about 1.7x a whole job with AVX512-BF16, same accuracy), fp32 elsewhere (emulated bf16 is slower than fp32)."""
from __future__ import annotations

import contextlib
import functools
import re

from tasks.common import ConfigError


def select_device(pref: str = "auto"):
    import torch

    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible: use --device auto or cpu")
    return torch.device(pref)


def amp_dtype(device, precision: str = "auto"):
    """None means plain fp32."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cuda_has_native_bf16(device=None) -> bool:
    """bf16 tensor cores: compute capability 8.0 and up (A100, H100, RTX 30xx+). Not
    `torch.cuda.is_bf16_supported()`, which is also True where bf16 is only emulated (T4, V100: slow); those take
    fp16 with loss scaling instead."""
    import torch

    return torch.cuda.get_device_capability(device) >= (8, 0)


def enable_tf32(device) -> bool:
    """fp32 matmuls and convolutions in TF32 on GPUs that have it (capability 8.0 and up): the fp32 path
    (`--precision fp32`, and the fp32 parts of a mixed-precision step) at tensor-core speed. Returns whether it
    was switched on. Process-wide; a no-op elsewhere."""
    import torch

    if device.type != "cuda" or not cuda_has_native_bf16(device):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def mixed_precision_name(dtype) -> str:
    """accelerate's name for an autocast dtype (None: fp32)."""
    import torch

    return {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with bf16 instructions (AMX-BF16 or AVX512-BF16), read from /proc/cpuinfo's flags. Elsewhere
    (other systems, ARM, older x86) False: fp32 is the safe choice there."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", info) is not None


def autocast(device, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe(device, dtype) -> str:
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name} ({str(dtype).replace('torch.', '') if dtype else 'fp32'})"
