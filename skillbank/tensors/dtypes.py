"""safetensors dtype names and the torch dtypes they stand for."""

from __future__ import annotations

import torch

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_TO_TORCH[_name] = getattr(torch, _attr)

TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in SAFETENSORS_TO_TORCH.items()}

# Same-width integer views: the lossless codec works on bit patterns through these.
BITS_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

FLOAT_NAMES = frozenset(n for n, dt in SAFETENSORS_TO_TORCH.items() if dt.is_floating_point)


def to_torch(name: str) -> torch.dtype:
    return SAFETENSORS_TO_TORCH[name]


def is_float(name: str) -> bool:
    """Only floating tensors are interpolated; integer and bool buffers are copied."""
    return name in FLOAT_NAMES


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merge arithmetic runs one step wider than storage so each result is rounded once."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


_EXPONENT_MASK = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000,
                  torch.float64: 0x7FF0000000000000}


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf, read off the exponent bits: an integer test, several times faster than isfinite."""
    mask = _EXPONENT_MASK.get(x.dtype)
    if mask is None:
        return bool(torch.isfinite(x).all()) if x.is_floating_point() else True
    bits = x.reshape(-1).view(BITS_VIEW[x.element_size()])
    m = torch.tensor(mask, dtype=bits.dtype)
    return not bool(((bits & m) == m).any())
