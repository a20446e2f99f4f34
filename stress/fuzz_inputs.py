"""What stress/fuzz.py feeds the parsers: valid seeds, and hypothesis strategies that damage them.

Every strategy starts from bytes skillbank itself (or the safetensors library) wrote, then lies in
one of the ways a hostile or broken file can: flipped bytes, truncation, trailing junk, a length
field that does not fit, and structured edits of the JSON header or footer (wrong dtypes, shapes
and offsets, huge and negative numbers, duplicate keys, deep nesting, non-UTF-8). Structured edits
reach the deep checks; random bytes mostly stop at the first one.
"""

from __future__ import annotations

import json
import re
import struct

import torch
import zstandard
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from skillbank.codecs import CODECS, get_codec
from skillbank.codecs.container import MAGIC
from skillbank.codecs.delta import HEADER as DELTA_HEADER
from skillbank.tensors.reader import MAX_HEADER_BYTES

TAIL = struct.Struct("<Q8s")
HUGE = [2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]
NASTY_NAMES = ["", "../../escape", "/abs/path", "a/../../b", "..", "a\x00b", "名前", "__metadata__",
               "x" * 5000, "C:\\win", "a\nb", " "]


def nasty_value(depth: int = 2):
    """Any JSON value a parser might not expect where it wants a number, list or string."""
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from(HUGE + [-1, 0, 1]),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
        st.sampled_from(NASTY_NAMES), st.sampled_from(["F32", "BF16", "I64", "F128", "f32", "BOOL"]))
    if depth == 0:
        return leaf
    return st.one_of(leaf, st.lists(nasty_value(depth - 1), max_size=4),
                     st.dictionaries(st.text(max_size=6), nasty_value(depth - 1), max_size=3))


def dumps(obj) -> bytes:
    """JSON as a sloppy writer might emit it: NaN/Infinity allowed, raw UTF-8 sometimes."""
    return json.dumps(obj, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def text_damage(draw, raw: bytes) -> bytes:
    """Byte-level lies inside JSON text that a dict edit cannot express."""
    kind = draw(st.sampled_from(["dup-key", "deep", "big-int", "non-utf8", "pad"] + ["none"] * 5))
    if kind == "dup-key" and raw.startswith(b"{") and len(raw) > 2:
        m = re.match(rb'\{("(?:[^"\\]|\\.)*":)', raw)
        if m:  # the first key again, with a value of our choosing, at the end of the object
            return raw[:-1] + b"," + m.group(1) + dumps(draw(nasty_value(1))) + b"}"
    if kind == "deep":
        depth = draw(st.sampled_from([100, 990, 5000, 100_000]))
        return re.sub(rb"\[", b"[" * depth, raw, count=1).replace(b"]", b"]" * depth, 1)
    if kind == "big-int":
        return re.sub(rb"\d+", b"9" * draw(st.sampled_from([400, 4301, 20000])), raw, count=1)
    if kind == "non-utf8":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + raw[at:]
    if kind == "pad":
        return raw + b" " * draw(st.integers(0, 7))
    return raw


@st.composite
def byte_damage(draw, raw: bytes, hot: int) -> bytes:
    """Flips (biased to the first `hot` bytes, where the framing is), truncation or junk."""
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "extend"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, max(len(raw) - 1, 0)))]
    if kind == "extend":
        return raw + draw(st.binary(min_size=1, max_size=64))
    out = bytearray(raw)
    for _ in range(draw(st.integers(1, 8))):
        if not out:
            break
        end = min(len(out), hot) if draw(st.booleans()) else len(out)
        pos = draw(st.integers(0, end - 1))
        out[pos] ^= draw(st.integers(1, 255))
    return bytes(out)


# ----------------------------------------------------------------------------- safetensors

def safetensors_seeds() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    a = {"w.bf16": torch.randn(4, 6, generator=g).to(torch.bfloat16),
         "b.f32": torch.randn(5, generator=g), "i.i64": torch.arange(3),
         "m.bool": torch.rand(2, 3, generator=g) > 0.5, "e.f16": torch.zeros(0, 4, dtype=torch.float16),
         "s.scalar": torch.tensor(2.5), "u.u8": torch.arange(7, dtype=torch.uint8)}
    b = {"x": torch.randn(2, 2, generator=g, dtype=torch.float64)}
    c = {"f8": torch.randn(3, 3, generator=g).to(torch.float8_e4m3fn), "i8": torch.arange(-4, 4, dtype=torch.int8)}
    return [st_save(a, metadata={"format": "pt"}), st_save(b), st_save(c, metadata={"k": "v"})]


def split_safetensors(raw: bytes) -> tuple[int, dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


@st.composite
def header_edit(draw, header: dict) -> None:
    """One structured lie, applied in place."""
    names = [k for k in header if k != "__metadata__"] or ["t"]
    name = draw(st.sampled_from(names))
    entry = header.get(name)
    kind = draw(st.sampled_from(["field", "offset", "shape", "dtype", "rename", "drop", "alias", "extra-key",
                                 "metadata", "entry", "add"]))
    if kind == "field" and isinstance(entry, dict):
        entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(nasty_value())
    elif kind == "offset" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
        i = draw(st.integers(0, len(entry["data_offsets"]) - 1)) if entry["data_offsets"] else 0
        if entry["data_offsets"]:
            old = entry["data_offsets"][i]
            entry["data_offsets"][i] = draw(st.one_of(st.integers(-16, 16).map(lambda d: old + d if isinstance(old, int) else d),
                                                      st.sampled_from(HUGE + [-1, 0])))
    elif kind == "shape" and isinstance(entry, dict):
        shape = list(entry["shape"]) if isinstance(entry.get("shape"), list) else []
        op = draw(st.sampled_from(["set", "append", "pop", "zero-huge"]))
        if op == "set" and shape:
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.one_of(st.integers(-2, 9), st.sampled_from(HUGE)))
        elif op == "append":
            shape.append(draw(st.one_of(st.integers(0, 3), st.sampled_from(HUGE))))
        elif op == "pop" and shape:
            shape.pop()
        else:  # zero elements, but a dimension no tensor library can hold
            shape = [0] + [draw(st.sampled_from(HUGE))] * draw(st.integers(1, 3))
        entry["shape"] = shape
    elif kind == "dtype" and isinstance(entry, dict):
        entry["dtype"] = draw(st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
                                              "F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "C64", "F4", "", "bf16"]))
    elif kind == "rename" and name in header:
        header[draw(st.sampled_from(NASTY_NAMES))] = header.pop(name)
    elif kind == "drop" and name in header:
        del header[name]
    elif kind == "alias" and isinstance(entry, dict):  # a second name over the same bytes
        header[name + ".alias"] = dict(entry)
    elif kind == "extra-key" and isinstance(entry, dict):
        entry[draw(st.text(max_size=8))] = draw(nasty_value(1))
    elif kind == "metadata":
        header["__metadata__"] = draw(st.one_of(nasty_value(), st.dictionaries(st.text(max_size=6), nasty_value(0))))
    elif kind == "entry":
        header[name] = draw(nasty_value())
    else:
        header[draw(st.text(max_size=10))] = {"dtype": draw(st.sampled_from(["F32", "U8", "I64"])),
                                              "shape": draw(st.lists(st.integers(0, 4), max_size=3)),
                                              "data_offsets": draw(st.lists(st.integers(-4, 200), min_size=2,
                                                                            max_size=2))}


@st.composite
def safetensors_input(draw) -> tuple[str, bytes]:
    """(what was done, the damaged file's bytes)."""
    seeds = safetensors_seeds_cached()
    raw = draw(st.sampled_from(seeds))
    n, header, data = split_safetensors(raw)
    kind = draw(st.sampled_from(["bytes", "length", "header", "header", "header", "raw-header", "splice"]))
    if kind == "bytes":
        return kind, draw(byte_damage(raw, 8 + n))
    if kind == "length":
        new = draw(st.one_of(st.sampled_from([0, 1, 2, 7, n - 1, n + 1, n + 8, len(raw) - 8, len(raw) - 7,
                                              len(raw), MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1] + HUGE[:-1]),
                             st.integers(0, 2**64 - 1)))
        return kind, struct.pack("<Q", new % 2**64) + raw[8:]
    if kind == "raw-header":
        text = draw(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
                              nasty_value().map(dumps)))
        return kind, struct.pack("<Q", len(text)) + text + data
    if kind == "splice":
        _, other_header, _ = split_safetensors(draw(st.sampled_from(seeds)))
        text = dumps(other_header)
        return kind, struct.pack("<Q", len(text)) + text + data
    for _ in range(draw(st.integers(1, 4))):
        draw(header_edit(header))
    text = draw(text_damage(dumps(header)))
    return kind, struct.pack("<Q", len(text)) + text + data


_SEEDS: list[bytes] = []


def safetensors_seeds_cached() -> list[bytes]:
    if not _SEEDS:
        _SEEDS.extend(safetensors_seeds())
    return _SEEDS


# ----------------------------------------------------------------------------- codecs

CODEC_PARAMS = {"xor-zstd": {}, "int8": {"group_size": 16}, "sparse-topk": {"density": 0.3},
                "dare": {"density": 0.5, "seed": 1}, "lowrank": {"rank": 2}, "bitdelta": {}}
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int32,
          torch.uint8, torch.bool, torch.float8_e4m3fn]
SHAPES = [(0,), (1,), (7,), (4, 6), (3, 1), (8, 16), (2, 3, 4)]


def pair(dtype: torch.dtype, shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A parent block and a finetuned one close to it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if dtype == torch.bool:
        return base > 0, (base + 0.3 * torch.randn(shape, generator=g)) > 0
    if not dtype.is_floating_point:
        p = (base * 50).to(dtype)
        return p, p + (torch.rand(shape, generator=g) > 0.7).to(dtype)
    return base.to(dtype), (base + 0.01 * torch.randn(shape, generator=g)).to(dtype)


def raw_frame(payload: bytes, declared: int | None, checksum: bool = False) -> bytes:
    """A zstd frame of raw blocks that declares `declared` bytes of content (None: no size)."""
    if declared is None:
        fhd, fcs, window = 0, b"", b"\x58"  # window descriptor: 2^(10+11) bytes
    else:
        fhd, fcs, window = (3 << 6) | (1 << 5), struct.pack("<Q", declared), b""
    fhd |= (1 << 2) if checksum else 0
    blocks = []
    chunks = [payload[i:i + 100_000] for i in range(0, len(payload), 100_000)] or [b""]
    for i, c in enumerate(chunks):
        last = int(i == len(chunks) - 1)
        blocks.append(struct.pack("<I", (len(c) << 3) | last)[:3] + c)
    return b"\x28\xb5\x2f\xfd" + bytes([fhd]) + window + fcs + b"".join(blocks) + (b"\0\0\0\0" if checksum else b"")


def _zstd_body(body: bytes) -> bytes | None:
    try:
        return zstandard.ZstdDecompressor().decompress(body)
    except zstandard.ZstdError:
        return None


@st.composite
def lossy_body_edit(draw, inner: bytes) -> bytes:
    """Edits inside a lossy codec's decompressed body: section count, lengths, section bytes."""
    out = bytearray(inner)
    kind = draw(st.sampled_from(["count", "length", "flip", "truncate", "extend"]))
    if kind == "count" and out:
        out[0] = draw(st.integers(0, 255))
    elif kind == "length" and len(out) >= 9:
        k = draw(st.integers(0, max(0, min(out[0], (len(out) - 1) // 8) - 1)))
        new = draw(st.one_of(st.integers(0, 64), st.sampled_from(HUGE[:-1])))
        out[1 + 8 * k:9 + 8 * k] = struct.pack("<Q", new % 2**64)
    elif kind == "flip" and out:
        for _ in range(draw(st.integers(1, 6))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del out[draw(st.integers(0, len(out))):]
    else:
        out += draw(st.binary(min_size=1, max_size=32))
    return bytes(out)


@st.composite
def codec_input(draw):
    """(codec name, parent block to decode against, damaged encoded block, what was done)."""
    name = draw(st.sampled_from(sorted(CODECS)))
    codec = get_codec(name, **CODEC_PARAMS.get(name, {}))
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from(SHAPES))
    parent, finetuned = pair(dtype, shape, draw(st.integers(0, 3)))
    blob = codec.encode(parent, finetuned)
    kind = draw(st.sampled_from(["bytes", "bytes", "header", "inner", "inner", "frame", "frame", "wrong-parent",
                                 "other-codec"]))
    if kind == "bytes":
        blob = draw(byte_damage(blob, 32))
    elif kind == "header" and name != "xor-zstd" and len(blob) >= DELTA_HEADER.size:
        tag, version, mode, n = DELTA_HEADER.unpack_from(blob)
        field = draw(st.sampled_from(["tag", "version", "mode", "n"]))
        tag = draw(st.sampled_from([b"SBq8", b"SBtk", b"SBdr", b"SBlr", b"SBbd", b"\0\0\0\0"])) if field == "tag" else tag
        version = draw(st.integers(0, 255)) if field == "version" else version
        mode = draw(st.integers(0, 255)) if field == "mode" else mode
        n = draw(st.one_of(st.integers(0, 400), st.sampled_from(HUGE[:-2]))) % 2**64 if field == "n" else n
        blob = DELTA_HEADER.pack(tag, version, mode, n) + blob[DELTA_HEADER.size:]
    elif kind == "header":  # xor-zstd: the plane count and the plane table
        out = bytearray(blob)
        pos = draw(st.integers(0, min(len(out), 1 + 5 * 8) - 1)) if out else 0
        if out:
            out[pos] = draw(st.integers(0, 255))
        blob = bytes(out)
    elif kind == "inner" and name != "xor-zstd" and len(blob) > DELTA_HEADER.size:
        inner = _zstd_body(blob[DELTA_HEADER.size:])
        if inner is not None and DELTA_HEADER.unpack_from(blob)[2] == 1:  # a LOSSY body
            edited = draw(lossy_body_edit(inner))
            frame = (zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(edited)
                     if draw(st.booleans()) else raw_frame(edited, len(edited)))
            blob = blob[:DELTA_HEADER.size] + frame
    elif kind == "frame":  # a frame whose declared content size lies
        declared = draw(st.one_of(st.none(), st.integers(0, 4096), st.sampled_from([2**31, 2**40, 2**62, 2**64 - 1])))
        payload = draw(st.binary(max_size=256))
        frame = raw_frame(payload, declared, draw(st.booleans()))
        if name == "xor-zstd":
            planes = draw(st.integers(1, 8))
            blob = bytes([planes]) + struct.pack("<BI", 1, len(frame)) * planes + frame * planes
        else:
            blob = DELTA_HEADER.pack(codec.tag, 1, draw(st.integers(0, 1)), parent.numel()) + frame
    elif kind == "wrong-parent":
        other = draw(st.sampled_from(DTYPES))
        other_shape = draw(st.sampled_from(SHAPES + [tuple(reversed(shape))]))
        parent = pair(other, other_shape, 0)[0]
    elif kind == "other-codec":
        other = draw(st.sampled_from(sorted(CODECS)))
        codec = get_codec(other, **CODEC_PARAMS.get(other, {}))
        name = other
    return name, codec, parent, blob, f"{kind} {dtype} {tuple(shape)}"


# ----------------------------------------------------------------------------- container

TV_TENSORS = [("a.weight", "F32", (8, 16), 2), ("b.bias", "BF16", (10,), 1), ("c.steps", "I64", (3,), 1)]
_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64}


def container_seed(codec_name: str) -> tuple[bytes, list[tuple[str, int, torch.Tensor]]]:
    """A valid task-vector object (built the way TaskVectorWriter lays it out) and its decode plan:
    (tensor, block index, parent block) for every block."""
    codec = get_codec(codec_name)  # default params: int8's one group per block survives a huge group_size
    body, index, plan = bytearray(MAGIC), {}, []
    for t, (name, dtype, shape, nblocks) in enumerate(TV_TENSORS):
        parent, finetuned = pair(_TORCH[dtype], shape, t)
        rows = shape[0] // nblocks
        entry = index.setdefault(name, {"dtype": dtype, "shape": list(shape), "blocks": []})
        for b in range(nblocks):
            p, f = (parent[b * rows:(b + 1) * rows], finetuned[b * rows:(b + 1) * rows]) if nblocks > 1 else (parent, finetuned)
            data = codec.encode(p, f)
            entry["blocks"].append([len(body), len(data)])
            body += data
            plan.append((name, b, p))
    footer = json.dumps({"codec": codec.name, "params": codec.params(), "block_elems": 1 << 20, "tensors": index},
                        sort_keys=True, separators=(",", ":")).encode()
    return bytes(body) + footer + TAIL.pack(len(footer), MAGIC), plan


def split_container(raw: bytes) -> tuple[bytes, dict]:
    n, _ = TAIL.unpack(raw[-TAIL.size:])
    return raw[:len(raw) - TAIL.size - n], json.loads(raw[len(raw) - TAIL.size - n:-TAIL.size])


@st.composite
def footer_edit(draw, footer: dict, blocks_end: int, size: int, kind: str | None = None) -> None:
    kind = kind or draw(st.sampled_from(["codec", "params", "param", "block_elems", "dtype", "shape", "blocks",
                                         "block", "drop", "rename", "top", "swap"]))
    tensors = footer.get("tensors") if isinstance(footer.get("tensors"), dict) else {}
    names = sorted(tensors) or ["a.weight"]
    name = draw(st.sampled_from(names))
    entry = tensors.get(name)
    if kind == "codec":
        footer["codec"] = draw(st.one_of(st.sampled_from(sorted(CODECS) + ["magic", ""]), nasty_value(1)))
    elif kind == "params":
        footer["params"] = draw(nasty_value())
    elif kind == "param":
        params = footer.get("params") if isinstance(footer.get("params"), dict) else {}
        own = sorted(params) or ["bogus"]
        key = draw(st.sampled_from(own + own + own + ["level", "group_size", "density", "rank", "bogus"]))
        params[key] = draw(st.one_of(st.sampled_from(HUGE[:-1] + [0, -5, 0.5, 1e-300, "fp16", None]), nasty_value(1)))
        footer["params"] = params
    elif kind == "block_elems":
        footer["block_elems"] = draw(st.one_of(nasty_value(1), st.sampled_from([float("inf"), 1e308, -1, 0])))
    elif kind in ("dtype", "shape", "blocks") and isinstance(entry, dict):
        entry[kind] = draw(nasty_value())
    elif kind == "block" and isinstance(entry, dict) and isinstance(entry.get("blocks"), list) and entry["blocks"]:
        i = draw(st.integers(0, len(entry["blocks"]) - 1))
        off, length = (entry["blocks"][i] + [0, 0])[:2] if isinstance(entry["blocks"][i], list) else (0, 0)
        off = off if isinstance(off, int) else 0
        choice = draw(st.sampled_from(["into-footer", "past-end", "negative", "huge", "shift", "value"]))
        entry["blocks"][i] = {
            "into-footer": [blocks_end - 2, 64], "past-end": [size - 4, 4096], "negative": [-8, 16],
            "huge": [off, draw(st.sampled_from(HUGE[:-1]))], "shift": [off + draw(st.integers(-8, 8)), length],
            "value": draw(nasty_value(1)),
        }[choice]
    elif kind == "drop" and name in tensors:
        del tensors[name]
    elif kind == "rename" and name in tensors:
        tensors[draw(st.sampled_from(NASTY_NAMES))] = tensors.pop(name)
    elif kind == "swap" and len(names) > 1 and isinstance(entry, dict):
        other = tensors.get(draw(st.sampled_from(names)))
        if isinstance(other, dict):
            entry["blocks"], other["blocks"] = other.get("blocks"), entry.get("blocks")
    elif kind == "top":
        footer[draw(st.sampled_from(["codec", "params", "block_elems", "tensors"]))] = draw(nasty_value())


@st.composite
def container_input(draw):
    """(damaged object bytes, decode plan, what was done)."""
    codec_name = draw(st.sampled_from(sorted(CODECS)))
    raw, plan = container_seed_cached(codec_name)
    kind = draw(st.sampled_from(["bytes", "tail", "footer", "footer", "param", "block", "raw-footer"]))
    if kind == "bytes":
        return draw(byte_damage(raw, len(MAGIC))) if draw(st.booleans()) else \
            raw[:-TAIL.size - 40] + draw(byte_damage(raw[-TAIL.size - 40:], 40 + TAIL.size)), plan, kind
    body, footer = split_container(raw)
    if kind == "tail":
        n = draw(st.one_of(st.sampled_from([0, 1, len(raw), len(raw) - TAIL.size, len(raw) - TAIL.size - len(MAGIC),
                                            len(raw) - TAIL.size - len(MAGIC) + 1] + HUGE[:-1]),
                           st.integers(0, 2**64 - 1)))
        magic = draw(st.sampled_from([MAGIC, b"SBTV0002", b"\0" * 8]))
        return raw[:-TAIL.size] + TAIL.pack(n % 2**64, magic), plan, kind
    if kind == "raw-footer":
        text = draw(st.one_of(st.binary(max_size=120), nasty_value().map(dumps)))
    elif kind in ("param", "block"):  # one lie that keeps the rest intact, so decoding goes deep
        draw(footer_edit(footer, len(body), len(raw), kind))
        text = dumps(footer)
    else:
        for _ in range(draw(st.integers(1, 3))):
            draw(footer_edit(footer, len(body), len(raw)))
        text = draw(text_damage(dumps(footer)))
    return body + text + TAIL.pack(len(text), MAGIC), plan, kind


_CONTAINERS: dict[str, tuple[bytes, list]] = {}


def container_seed_cached(codec_name: str):
    if codec_name not in _CONTAINERS:
        _CONTAINERS[codec_name] = container_seed(codec_name)
    return _CONTAINERS[codec_name]

