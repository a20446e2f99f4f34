"""What every lossy task-vector codec shares: the payload frame, the exact fallback, the rebuild rule.

A lossy codec (int8, sparse-topk, dare, lowrank, bitdelta) stores an approximation of the delta
`finetuned - parent`, computed in the wide dtype (float64 for fp64 tensors, float32 otherwise),
and decodes a block as

    round_to_dtype(parent_wide + decoded_delta)

where the zeros of `decoded_delta` are -0.0, the additive identity, so a weight whose delta decodes
to zero keeps its parent's exact bits. The merged version is defined by what decode returns, so
decode must give the same bytes every time, on every machine: it uses elementwise IEEE operations
only (conversions, one multiply, one add, selects), never a reduction or a BLAS call.

Payload of one block, never pickle:

    header   struct "<4sBBQ": codec tag, format version, mode, element count of the block
    body     mode EXACT: an xor-zstd block (lossless), used for integer and bool tensors, float8,
             empty blocks, and float blocks a codec cannot represent (a non-finite delta, a scale
             out of fp32 range, low-rank factors no smaller than the raw block)
             mode LOSSY: one zstd frame (with content size and checksum) holding "<B" the section
             count, "<Q" per section its length, then the sections (codec-specific arrays)

Malformed payloads raise IntegrityError with one line, never IndexError or ValueError.
"""

from __future__ import annotations

import math
import struct
import threading

import numpy as np
import torch
import zstandard

from skillbank.codecs.lossless import XorZstd
from skillbank.errors import IntegrityError, ValidationError, show

VERSION = 1
EXACT, LOSSY = 0, 1
ZSTD_LEVEL = 3
HEADER = struct.Struct("<4sBBQ")
_COUNT = struct.Struct("<B")
_LEN = struct.Struct("<Q")

# Float dtypes a lossy codec approximates; every other dtype (ints, bool, float8) is stored exactly.
LOSSY_DTYPES = frozenset({torch.bfloat16, torch.float16, torch.float32, torch.float64})

_tls = threading.local()  # zstd contexts are not thread safe: one set per thread


def _ctx():
    if not hasattr(_tls, "c"):
        _tls.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
        _tls.d = zstandard.ZstdDecompressor()
        _tls.exact = XorZstd()
    return _tls


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype deltas are computed and decoded in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matrix(t: torch.Tensor) -> torch.Tensor:
    """(rows, row_elems) for ndim >= 2, flat otherwise: the block as a codec works on it."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(-1)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of `t` in its own dtype."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_from(section: bytes, dtype: torch.dtype, count: int, what: str) -> torch.Tensor:
    """`count` elements of `dtype` from `section`, which must hold exactly that many."""
    size = torch.empty((), dtype=dtype).element_size()
    if len(section) != count * size:
        raise IntegrityError(f"{what}: {len(section)} bytes, expected {count * size}")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(section), dtype=torch.uint8).view(dtype)


def pack_mask(mask: torch.Tensor) -> bytes:
    """A bool tensor as a bitmap (numpy packbits, big-endian bit order, zero padding)."""
    return np.packbits(mask.detach().cpu().reshape(-1).numpy()).tobytes()


def unpack_mask(section: bytes, count: int, what: str) -> torch.Tensor:
    if len(section) != (count + 7) // 8:
        raise IntegrityError(f"{what}: {len(section)} bytes, expected {(count + 7) // 8} for {count} bits")
    bits = np.unpackbits(np.frombuffer(section, dtype=np.uint8))
    if bits[count:].any():
        raise IntegrityError(f"{what}: nonzero padding bits")
    return torch.from_numpy(bits[:count].astype(bool))


def check_finite(t: torch.Tensor, what: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise IntegrityError(f"{what} holds NaN or Inf")


def apply_delta(parent: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """round_to_dtype(parent_wide + delta), with -0.0 for zero deltas; elementwise, on parent's device."""
    wide = wide_dtype(parent.dtype)
    delta = delta.to(parent.device).reshape(parent.shape)
    delta = torch.where(delta == 0, torch.tensor(-0.0, dtype=wide, device=parent.device), delta)
    return torch.add(parent.detach().to(wide), delta).to(parent.dtype)


# Sparse deltas (sparse-topk, dare): a bitmap of the kept entries and their values in the stored dtype.

def masked_sections(mask: torch.Tensor, values: torch.Tensor) -> list[bytes] | None:
    """Sections for `values` (already in the stored dtype) at `mask`; None when a value overflowed."""
    if not bool(torch.isfinite(values).all()):
        return None
    return [pack_mask(mask), tensor_bytes(values)]


def masked_delta(sections: list[bytes], shape: torch.Size, dtype: torch.dtype, device) -> torch.Tensor:
    n = math.prod(shape)
    mask = unpack_mask(sections[0], n, "mask")
    kept = int(mask.sum())
    values = tensor_from(sections[1], dtype, kept, "kept values")
    check_finite(values, "kept values")
    wide = wide_dtype(dtype)
    delta = torch.zeros(n, dtype=wide)
    delta[mask] = values.to(wide)
    return delta.reshape(shape).to(device)


def positive_float(value, what: str, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{what} must be a number, not {show(value)}")
    value = float(value)
    if not (value > 0 and (upper is None or value <= upper)):
        raise ValidationError(f"{what} must be in (0, {upper}], not {value}" if upper is not None
                              else f"{what} must be positive, not {value}")
    return value


def int_param(value, what: str, lower: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ValidationError(f"{what} must be an integer, not {show(value)}")
    value = int(value)
    if value < lower:
        raise ValidationError(f"{what} must be >= {lower}, not {value}")
    return value


class DeltaCodec:
    """Base of the lossy codecs: subclasses set `name`, `tag`, `sections` and implement
    `encode_delta` / `decode_delta_sections`; this class does the frame, checks and fallbacks."""

    name = ""
    tag = b""
    sections = 0  # how many sections a LOSSY body holds
    lossless = False
    device_exact = True  # decode gives the same bytes on CPU and CUDA

    def params(self) -> dict:
        raise NotImplementedError

    def encode_delta(self, delta: torch.Tensor, parent: torch.Tensor) -> list[bytes] | None:
        """Sections for a finite wide `delta` (matrix() shape) of `parent` (CPU); None: store exactly."""
        raise NotImplementedError

    def decode_delta_sections(self, sections: list[bytes], shape: torch.Size, dtype: torch.dtype,
                              device) -> torch.Tensor:
        """The wide delta of shape `shape` on `device`; IntegrityError when the sections do not fit."""
        raise NotImplementedError

    # ------------------------------------------------------------------ encode

    def encode(self, parent: torch.Tensor, finetuned: torch.Tensor) -> bytes:
        if parent.shape != finetuned.shape or parent.dtype != finetuned.dtype:
            raise ValidationError(f"{self.name}: finetuned block {finetuned.dtype} {list(finetuned.shape)} does not "
                                  f"match the parent's {parent.dtype} {list(parent.shape)}")
        parent, finetuned = parent.detach().cpu(), finetuned.detach().cpu()
        n = parent.numel()
        if parent.dtype in LOSSY_DTYPES and n:
            wide = wide_dtype(parent.dtype)
            p = matrix(parent).to(wide)
            delta = torch.sub(matrix(finetuned).to(wide), p)
            if bool(torch.isfinite(delta).all()):
                sections = self.encode_delta(delta, parent)
                if sections is not None:
                    assert len(sections) == self.sections
                    body = b"".join([_COUNT.pack(len(sections)), *(_LEN.pack(len(s)) for s in sections), *sections])
                    return HEADER.pack(self.tag, VERSION, LOSSY, n) + _ctx().c.compress(body)
        return HEADER.pack(self.tag, VERSION, EXACT, n) + _ctx().exact.encode(parent, finetuned)

    # ------------------------------------------------------------------ decode

    def _open(self, data: bytes, parent: torch.Tensor) -> tuple[int, bytes]:
        if len(data) < HEADER.size:
            raise IntegrityError(f"{self.name} block is {len(data)} bytes, shorter than its header")
        tag, version, mode, n = HEADER.unpack_from(data)
        if tag != self.tag:
            raise IntegrityError(f"block is not a {self.name} block (tag {tag!r})")
        if version != VERSION:
            raise IntegrityError(f"{self.name} block has format version {version}, this skillbank reads {VERSION}")
        if n != parent.numel():
            raise IntegrityError(f"{self.name} block holds {n} elements, the parent block {parent.numel()}")
        if mode not in (EXACT, LOSSY) or (mode == LOSSY and (parent.dtype not in LOSSY_DTYPES or n == 0)):
            raise IntegrityError(f"{self.name} block has mode {mode}, not valid for a {parent.dtype} block")
        return mode, bytes(data[HEADER.size:])

    def _sections(self, body: bytes, n: int) -> list[bytes]:
        bound = 9 * n + 1024  # above what any codec writes for n elements
        try:
            size = zstandard.frame_content_size(body)
            if size < 0 or size > bound:
                raise IntegrityError(f"{self.name} block declares {size} bytes of content (at most {bound})")
            # zstd refuses output beyond the declared size, so this stays within `bound`.
            stream = _ctx().d.decompressobj()
            raw = stream.decompress(body)
        except zstandard.ZstdError as e:
            raise IntegrityError(f"{self.name} block does not decompress ({e})") from None
        if not stream.eof or stream.unused_data or len(raw) != size:
            raise IntegrityError(f"{self.name} block is not exactly one complete zstd frame")
        if len(raw) < _COUNT.size or raw[0] != self.sections:
            raise IntegrityError(f"{self.name} block does not hold {self.sections} sections")
        pos = _COUNT.size + self.sections * _LEN.size
        if len(raw) < pos:
            raise IntegrityError(f"{self.name} block is truncated")
        lengths = [_LEN.unpack_from(raw, _COUNT.size + i * _LEN.size)[0] for i in range(self.sections)]
        if pos + sum(lengths) != len(raw):
            raise IntegrityError(f"{self.name} block sections do not add up to its length")
        out = []
        for length in lengths:
            out.append(raw[pos:pos + length])
            pos += length
        return out

    def _lossy_delta(self, body: bytes, parent: torch.Tensor) -> torch.Tensor:
        try:
            return self.decode_delta_sections(self._sections(body, parent.numel()), matrix(parent).shape,
                                              parent.dtype, parent.device)
        except (ValueError, IndexError, struct.error) as e:  # a safety net behind the explicit checks
            raise IntegrityError(f"{self.name} block is malformed ({type(e).__name__}: {e})") from None

    def decode_delta(self, data: bytes, parent: torch.Tensor) -> torch.Tensor | None:
        """The decoded wide delta (matrix() shape, parent's device), or None for a block stored exactly."""
        mode, body = self._open(data, parent)
        return None if mode == EXACT else self._lossy_delta(body, parent)

    def decode(self, data: bytes, parent: torch.Tensor) -> torch.Tensor:
        mode, body = self._open(data, parent)
        if mode == EXACT:
            return _ctx().exact.decode(body, parent.detach().cpu()).to(parent.device)
        return apply_delta(parent, self._lossy_delta(body, parent))
