#!/usr/bin/env python3
"""Merge benchmark: skillbank init / add-skill / checkout against plain peers, on synthetic models.

One run of this script:

1. generates a synthetic base checkpoint shaped like a Hugging Face Llama-style policy backbone
   (bf16; embedding, per-layer q/k/v/o and gate/up/down matrices, RMSNorm weights, final norm,
   lm_head; sharded with `model.safetensors.index.json` when larger than the shard size), and a
   "finetuned" checkpoint = base + a small seeded delta, chunk by chunk (neither model is ever held
   in memory; generation is not timed);
2. times each of these as its own subprocess (wall, trailing `sync`, peak RSS from
   `/usr/bin/time -v`, CPU used by other processes meanwhile), with the page cache dropped before
   every run when it can be (root), else after a warm-up read of that run's inputs:
     - `skillbank init --base BASE`, `skillbank add-skill s --finetuned FT --alpha A`,
       `skillbank checkout v1 --out DIR`;
     - peers computing the same merge `(1 - A) * base + A * ft`: a plain safetensors script
       (load_file / fp32 merge / save_file, one shard at a time), mergekit's `linear` method, and a
       plain `cp` of the finetuned weights (the machine's I/O ceiling);
3. checks that every merged output matches an fp32 reference on sampled tensors;
4. measures every registered task-vector codec (`skillbank.codecs.CODECS`, read at run time) on a
   realistic task vector: a small transformer is pretrained, then finetuned with Adam, and both are
   saved in bf16.

Examples:
    python benchmarks/merge_bench.py --quick --no-peers          # smoke check, well under a minute
    python benchmarks/merge_bench.py --size 4GB --mergekit-yaml /path/to/venv/bin/mergekit-yaml
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

GB = 1000**3
MB = 1000**2
ROOT = Path(__file__).resolve().parents[1]

# name -> (hidden, intermediate, layers, vocab, heads, shard size in bytes)
PRESETS = {
    "quick": dict(hidden=512, intermediate=1376, layers=4, vocab=8192, heads=4, shard_bytes=16 * MB),
    "1GB": dict(hidden=2048, intermediate=5632, layers=7, vocab=32000, heads=16, shard_bytes=5 * GB),
    "4GB": dict(hidden=2560, intermediate=6912, layers=23, vocab=32000, heads=20, shard_bytes=2 * GB),
    "7B": dict(hidden=4096, intermediate=11008, layers=32, vocab=32000, heads=32, shard_bytes=5 * GB),
}
GEN_CHUNK_ELEMS = 16 << 20  # elements generated at a time (32 MB of bf16)
SAMPLE_ELEMS = 1 << 22      # elements per sampled tensor for the correctness check


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- synthetic models


@dataclass
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    shard_bytes: int

    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, kind) in the order a Hugging Face Llama state dict is saved."""
        h, i = self.hidden, self.intermediate
        out = [("model.embed_tokens.weight", (self.vocab, h), "matrix")]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h), "matrix"),
                (p + "self_attn.k_proj.weight", (h, h), "matrix"),
                (p + "self_attn.v_proj.weight", (h, h), "matrix"),
                (p + "self_attn.o_proj.weight", (h, h), "matrix"),
                (p + "mlp.gate_proj.weight", (i, h), "matrix"),
                (p + "mlp.up_proj.weight", (i, h), "matrix"),
                (p + "mlp.down_proj.weight", (h, i), "matrix"),
                (p + "input_layernorm.weight", (h,), "norm"),
                (p + "post_attention_layernorm.weight", (h,), "norm"),
            ]
        out += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (self.vocab, h), "matrix")]
        return out

    @property
    def params(self) -> int:
        return sum(math.prod(s) for _, s, _ in self.tensors())

    @property
    def nbytes(self) -> int:
        return 2 * self.params

    def shards(self) -> list[list[tuple[str, tuple[int, ...], str]]]:
        """Greedy in save order, like transformers' `max_shard_size`."""
        shards, cur, size = [], [], 0
        for t in self.tensors():
            b = 2 * math.prod(t[1])
            if cur and size + b > self.shard_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append(t)
            size += b
        shards.append(cur)
        return shards

    def shard_names(self) -> list[str]:
        n = len(self.shards())
        return ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.heads, "vocab_size": self.vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2,
        }


def _header(specs) -> bytes:
    hdr, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in specs:
        n = 2 * math.prod(shape)
        hdr[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _seed(seed: int, tensor: int, chunk: int, stream: int) -> int:
    return ((((seed * 1_000_003) + tensor) * 1_000_033 + chunk) * 4 + stream) % (1 << 63)


@dataclass
class GenStats:
    changed: int = 0
    elems: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0


def generate(shape: ModelShape, base_dir: Path, ft_dir: Path, seed: int, delta_rel: float) -> GenStats:
    """Write base and finetuned checkpoints side by side, one chunk of rows at a time."""
    stats = GenStats()
    names = shape.shard_names()
    weight_map = {}
    index = 0
    for d in (base_dir, ft_dir):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(shape.hf_config(), indent=2) + "\n")
    for shard_name, specs in zip(names, shape.shards()):
        with open(base_dir / shard_name, "wb") as fb, open(ft_dir / shard_name, "wb") as ff:
            h = _header(specs)
            fb.write(h)
            ff.write(h)
            for name, shp, kind in specs:
                weight_map[name] = shard_name
                row = shp[1] if len(shp) == 2 else shp[0]
                rows = shp[0] if len(shp) == 2 else 1
                step = max(1, GEN_CHUNK_ELEMS // row)
                scale = 0.02 if kind == "matrix" else 1.0  # rms of the tensor's values
                for c, r0 in enumerate(range(0, rows, step)):
                    n = min(step, rows - r0) * row
                    g = torch.Generator().manual_seed(_seed(seed, index, c, 0))
                    x = torch.randn(n, generator=g)
                    base = (x.mul_(0.02) if kind == "matrix" else x.mul_(0.05).add_(1.0)).to(torch.bfloat16)
                    g.manual_seed(_seed(seed, index, c, 1))
                    delta = torch.randn(n, generator=g).mul_(delta_rel * scale)
                    b32 = base.float()
                    ft = delta.add_(b32).to(torch.bfloat16)
                    d32 = ft.float().sub_(b32)
                    stats.changed += int(torch.count_nonzero(d32))
                    stats.elems += n
                    stats.delta_sq += float(d32.double().square().sum())
                    stats.base_sq += float(b32.double().square().sum())
                    fb.write(base.view(torch.int16).numpy().data)
                    ff.write(ft.view(torch.int16).numpy().data)
                index += 1
            for f in (fb, ff):
                f.flush()
                os.fsync(f.fileno())
    if len(names) > 1:
        idx = {"metadata": {"total_size": shape.nbytes}, "weight_map": weight_map}
        for d in (base_dir, ft_dir):
            (d / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2) + "\n")
    return stats


def weights_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file()) if Path(d).exists() else 0


# ----------------------------------------------------------------------------- sampled correctness


def sample_names(shape: ModelShape) -> list[str]:
    last = shape.layers - 1
    return ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            f"model.layers.{last}.mlp.down_proj.weight", f"model.layers.{last}.post_attention_layernorm.weight",
            "model.norm.weight", "lm_head.weight"]


def read_samples(d: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    d = Path(d)
    idx = d / "model.safetensors.index.json"
    where = json.loads(idx.read_text())["weight_map"] if idx.exists() else {}
    out = {}
    for name in names:
        with safe_open(str(d / where.get(name, "model.safetensors")), framework="pt") as f:
            sl = f.get_slice(name)
            shp = sl.get_shape()
            rows = shp[0] if len(shp) == 1 else max(1, min(shp[0], SAMPLE_ELEMS // shp[1]))
            out[name] = sl[:rows].clone()
    return out


def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[int, int, float]:
    """(elements that differ, elements compared, max |difference|)."""
    diff = total = 0
    worst = 0.0
    for k, r in ref.items():
        g = got[k]
        total += r.numel()
        ne = g.view(torch.int16) != r.view(torch.int16)
        diff += int(ne.sum())
        if bool(ne.any()):
            worst = max(worst, float((g.float() - r.float()).abs().max()))
    return diff, total, worst


# ----------------------------------------------------------------------------- measuring


def read_cpu_busy() -> tuple[float, float]:
    """(busy seconds, total seconds) over all CPUs, from /proc/stat."""
    try:
        f = open("/proc/stat").readline().split()[1:]
    except OSError:
        return 0.0, 0.0
    v = [int(x) for x in f]
    hz = os.sysconf("SC_CLK_TCK")
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / hz, sum(v[:8]) / hz


def other_cpu_now(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPUs busy over `seconds` (this process sleeps meanwhile)."""
    b0, t0 = read_cpu_busy()
    time.sleep(seconds)
    b1, t1 = read_cpu_busy()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def wait_idle(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait s) until the machine is quiet; returns the last busy fraction seen."""
    end = time.monotonic() + max_wait
    busy = other_cpu_now(1.0)
    while busy > threshold and time.monotonic() < end:
        busy = other_cpu_now(2.0)
    return busy


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm_read(paths: list[Path]) -> None:
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


@dataclass
class Row:
    label: str
    argv: list[str]
    ok: bool = False
    wall: float = 0.0
    sync: float = 0.0
    rss_mb: float = 0.0
    cpu_s: float = 0.0
    other_cpu: float = 0.0  # fraction of the machine used by other processes during the run
    gbytes: float = 0.0
    note: str = ""
    stdout: str = ""

    @property
    def total(self) -> float:
        return self.wall + self.sync

    @property
    def gbps(self) -> float:
        return self.gbytes / self.total if self.ok and self.total else 0.0


class Runner:
    def __init__(self, work: Path, cache: str, idle_wait: float, nice: int = 0):
        self.work = work
        self.nice = nice
        self.time_bin = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
        self.cache = cache
        self.idle_wait = idle_wait
        self.cold = False
        if cache == "cold":
            self.cold = drop_caches()
        self.n = 0

    def describe(self) -> str:
        peak = f"peak RSS from {'/usr/bin/time -v' if self.time_bin else 'os.wait4 rusage'}"
        if self.cold:
            return (f"cold cache: `sync; echo 3 > /proc/sys/vm/drop_caches` before every measured run; {peak}"
                    + (f"; every run under `nice -n {self.nice}`" if self.nice else ""))
        why = "dropping the page cache failed (not root?)" if self.cache == "cold" else "--cache warm"
        return (f"WARM cache ({why}): every run's inputs are read once right before it; {peak}"
                + (f"; every run under `nice -n {self.nice}`" if self.nice else ""))

    def run(self, label: str, argv: list[str], gbytes: float, inputs: list[Path], env=None) -> Row:
        row = Row(label, argv, gbytes=gbytes / GB)
        self.n += 1
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        tfile = logs / f"{self.n:02d}.time"
        if self.idle_wait:
            wait_idle(self.idle_wait)
        if self.cold:
            drop_caches()
        else:
            warm_read(inputs)
        full = [self.time_bin, "-v", "-o", str(tfile), *argv] if self.time_bin else argv
        if self.nice:
            full = ["nice", "-n", str(self.nice), *full]
        b0, c0 = read_cpu_busy()
        t0 = time.perf_counter()
        with open(logs / f"{self.n:02d}.out", "w") as out, open(logs / f"{self.n:02d}.err", "w") as err:
            p = subprocess.Popen(full, stdout=out, stderr=err, env=env, cwd=self.work)
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
        row.wall = time.perf_counter() - t0
        b1, c1 = read_cpu_busy()
        t1 = time.perf_counter()
        os.sync()
        row.sync = time.perf_counter() - t1
        row.stdout = (logs / f"{self.n:02d}.out").read_text()
        err_text = (logs / f"{self.n:02d}.err").read_text()
        if self.time_bin and tfile.exists():
            tv = tfile.read_text()
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", tv)
            row.rss_mb = int(m.group(1)) * 1024 / MB if m else 0.0
            u = re.search(r"User time \(seconds\): ([\d.]+)", tv)
            s = re.search(r"System time \(seconds\): ([\d.]+)", tv)
            row.cpu_s = (float(u.group(1)) if u else 0) + (float(s.group(1)) if s else 0)
            m = re.search(r"Exit status: (\d+)", tv)
            rc = int(m.group(1)) if m else p.returncode
        else:
            row.rss_mb = ru.ru_maxrss * 1024 / MB
            row.cpu_s = ru.ru_utime + ru.ru_stime
            rc = p.returncode
        ncpu = os.cpu_count() or 1
        other = max(0.0, (b1 - b0) - row.cpu_s)
        row.other_cpu = other / (row.wall * ncpu) if row.wall else 0.0
        row.ok = rc == 0
        if not row.ok:
            tail = "\n".join((err_text.strip() or row.stdout.strip()).splitlines()[-15:])
            row.note = f"exit {rc}"
            log(f"  !! {label} failed (exit {rc}):\n" + textwrap.indent(tail, "     "))
        log(f"  {label}: {'ok' if row.ok else 'FAILED'} wall {row.wall:.2f}s sync {row.sync:.2f}s "
            f"rss {row.rss_mb:.0f}MB other-cpu {100 * row.other_cpu:.0f}%")
        return row


# ----------------------------------------------------------------------------- peers

PLAIN_PEER = '''\
"""The merge as a plain script: load_file both, fp32 merge, cast back, save_file (one shard at a time)."""
import json, os, shutil, sys
import torch
from safetensors.torch import load_file, save_file

base, ft, out, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
os.makedirs(out, exist_ok=True)
index = os.path.join(base, "model.safetensors.index.json")
if os.path.exists(index):
    shards = sorted(set(json.load(open(index))["weight_map"].values()))
    shutil.copy(index, out)
else:
    shards = ["model.safetensors"]
for shard in shards:
    b = load_file(os.path.join(base, shard))
    f = load_file(os.path.join(ft, shard))
    merged = {}
    for name in list(b):
        p, q = b.pop(name), f.pop(name)
        merged[name] = ((1 - alpha) * p.float() + alpha * q.float()).to(p.dtype)
        del p, q
    save_file(merged, os.path.join(out, shard), metadata={"format": "pt"})
    del merged, b, f
if os.path.exists(os.path.join(base, "config.json")):
    shutil.copy(os.path.join(base, "config.json"), out)
'''


def mergekit_config(base: Path, ft: Path, alpha: float) -> str:
    return textwrap.dedent(f"""\
        merge_method: linear
        dtype: bfloat16
        parameters:
          normalize: true
        models:
          - model: {base}
            parameters:
              weight: {1 - alpha:.6g}
          - model: {ft}
            parameters:
              weight: {alpha:.6g}
        """)


# ----------------------------------------------------------------------------- codecs on a real delta


def train_small_model(quick: bool, seed: int):
    """Pretrain a small Llama-shaped transformer on one synthetic language, finetune it on another.

    Returns (base state dict, finetuned state dict, info), both in bf16 as a checkpoint would be
    saved; the finetune starts from the bf16 base upcast to fp32 (fp32 master weights, Adam).
    """
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    d, layers, ff, vocab, heads = (128, 2, 352, 512, 4) if quick else (256, 4, 688, 1024, 4)
    pre_steps, ft_steps = (40, 40) if quick else (150, 300)
    batch, seq = 8, 64

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = nn.RMSNorm(d)
            self.post_attention_layernorm = nn.RMSNorm(d)
            self.self_attn = nn.ModuleDict({k: nn.Linear(d, d, bias=False) for k in ("q_proj", "k_proj", "v_proj", "o_proj")})
            self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(d, ff, bias=False), "up_proj": nn.Linear(d, ff, bias=False),
                                      "down_proj": nn.Linear(ff, d, bias=False)})

        def forward(self, x):
            b, t, _ = x.shape
            h = self.input_layernorm(x)
            a = self.self_attn
            q, k, v = (a[n](h).view(b, t, heads, -1).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + a["o_proj"](o)
            h = self.post_attention_layernorm(x)
            m = self.mlp
            return x + m["down_proj"](F.silu(m["gate_proj"](h)) * m["up_proj"](h))

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.ModuleDict({"embed_tokens": nn.Embedding(vocab, d),
                                        "layers": nn.ModuleList(Block() for _ in range(layers)),
                                        "norm": nn.RMSNorm(d)})
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)

        def forward(self, ids):
            x = self.model["embed_tokens"](ids) + self.pos[: ids.shape[1]]
            for blk in self.model["layers"]:
                x = blk(x)
            return self.lm_head(self.model["norm"](x))

    def language(g):
        # A sparse Markov chain: each token has 4 likely successors.
        nxt = torch.randint(0, vocab, (vocab, 4), generator=g)
        probs = torch.softmax(torch.randn(vocab, 4, generator=g) * 2, dim=1)
        return nxt, probs

    def batch_of(lang, g):
        nxt, probs = lang
        ids = torch.empty(batch, seq + 1, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(seq):
            cur = ids[:, t]
            choice = torch.multinomial(probs[cur], 1, generator=g).squeeze(1)
            ids[:, t + 1] = nxt[cur, choice]
        return ids[:, :-1], ids[:, 1:]

    def train(model, lang, steps, lr, g):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        loss = None
        for _ in range(steps):
            x, y = batch_of(lang, g)
            loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: more threads only add contention on a shared machine
    g = torch.Generator().manual_seed(seed)
    pre_lang, new_lang = language(g), language(g)
    model = TinyLM()
    t0 = time.perf_counter()
    pre_loss = train(model, pre_lang, pre_steps, 2e-3, g)
    base = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in base.items()})
    ft_loss = train(model, new_lang, ft_steps, 1e-4, g)
    ft = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    info = {"model": f"{layers}-layer transformer, d={d}, ff={ff}, vocab={vocab}",
            "params": sum(v.numel() for v in base.values()),
            "recipe": f"pretrain {pre_steps} AdamW steps lr 2e-3 (final loss {pre_loss:.2f}), finetune on a new "
                      f"synthetic language {ft_steps} AdamW steps lr 1e-4 (final loss {ft_loss:.2f}), "
                      f"batch {batch}x{seq}, saved in bf16",
            "train_s": time.perf_counter() - t0}
    torch.set_num_threads(threads)
    return base, ft, info


def codec_table(quick: bool, seed: int) -> tuple[list[dict], dict]:
    from skillbank.codecs import CODECS, get_codec
    try:  # the block grid lives in merge/plan.py since the executor rework; engine.py re-exports it
        from skillbank.merge.plan import block_view, blocks
    except ImportError:
        from skillbank.merge.engine import block_view, blocks
    from skillbank.tensors import TensorSpec

    base, ft, info = train_small_model(quick, seed)
    torch.set_num_threads(1)  # per-core codec speed; the engine's own threading shows in the runs above
    items = []  # (parent block, finetuned block)
    delta_sq = parent_sq = 0.0
    changed = elems = 0
    for name in sorted(base):
        p, f = base[name], ft[name]
        spec = TensorSpec(name, "BF16", tuple(p.shape))
        pf, ff_ = p.reshape(-1), f.reshape(-1)
        for _, first, count in blocks(spec):
            items.append((block_view(pf[first:first + count], spec), block_view(ff_[first:first + count], spec)))
        d = f.double() - p.double()
        delta_sq += float(d.square().sum())
        parent_sq += float(p.double().square().sum())
        changed += int(torch.count_nonzero(d))
        elems += p.numel()
    raw = sum(p.numel() * p.element_size() for p, _ in items)
    info.update(rel_norm=math.sqrt(delta_sq / parent_sq), changed=changed / elems, raw_bytes=raw,
                blocks=len(items))
    min_s = 0.2 if quick else 1.0
    rows = []
    for name in sorted(CODECS):
        r = {"codec": name}
        try:
            codec = get_codec(name)
            r["lossless"] = bool(getattr(codec, "lossless", False))
            reps, enc_s, t0 = 0, 0.0, time.perf_counter()
            while True:
                t = time.perf_counter()
                data = [codec.encode(p, f) for p, f in items]
                enc_s += time.perf_counter() - t
                reps += 1
                if time.perf_counter() - t0 >= min_s:
                    break
            stored = sum(len(x) for x in data)
            enc = enc_s / reps
            reps, dec_s, t0 = 0, 0.0, time.perf_counter()
            while True:
                t = time.perf_counter()
                out = [codec.decode(x, p) for x, (p, _) in zip(data, items)]
                dec_s += time.perf_counter() - t
                reps += 1
                if time.perf_counter() - t0 >= min_s:
                    break
            dec = dec_s / reps
            err_sq = sum(float((o.double() - f.double().view(o.shape)).square().sum()) for o, (_, f) in zip(out, items))
            r.update(stored=stored, ratio=stored / raw, smaller=raw / stored if stored else float("inf"),
                     enc_gbps=raw / enc / GB, dec_gbps=raw / dec / GB,
                     rel_error=math.sqrt(err_sq / delta_sq) if delta_sq else 0.0)
        except Exception as e:  # a codec under construction must not stop the benchmark
            r["error"] = f"{type(e).__name__}: {e}"
        rows.append(r)
    return rows, info


# ----------------------------------------------------------------------------- environment


def machine_info(work: Path) -> dict:
    info = {"python": platform.python_version(), "kernel": platform.release(), "cores": os.cpu_count()}
    try:
        cpu = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        info["cpu"] = cpu[0] if cpu else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        mem = next(ln for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
        info["ram_gib"] = int(mem.split()[1]) / 1024**2
    except (OSError, StopIteration):
        info["ram_gib"] = float("nan")
    info["disk_free_gb"] = shutil.disk_usage(work).free / GB
    import safetensors

    info["torch"] = torch.__version__
    info["safetensors"] = safetensors.__version__
    try:
        import skillbank

        info["skillbank"] = getattr(skillbank, "__version__", "?")
    except ImportError:
        info["skillbank"] = "not importable"
    info["loadavg"] = os.getloadavg()
    return info


def code_fingerprint() -> str:
    """git HEAD plus a hash of the skillbank sources as they are now (the tree is edited in parallel)."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "skillbank").rglob("*.py")):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "skillbank"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "?", ""
    return f"git {head or '?'}{' + uncommitted changes' if dirty else ''}, skillbank/*.py sha256 {h.hexdigest()[:12]}"


def skillbank_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "skillbank"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("skillbank")
    return [found] if found else [sys.executable, "-m", "skillbank.cli"]


def executor_options(sb: list[str]) -> str:
    seen = []
    for cmd in ("checkout", "add-skill"):
        try:
            h = subprocess.run([*sb, cmd, "--help"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        opts = [o for o in ("--chunk-mb", "--device", "--prefetch", "--threads") if o in h]
        if opts:
            seen.append(f"{cmd}: {' '.join(opts)}")
    return "; ".join(seen) + " (defaults used)" if seen else "none (no --chunk-mb/--device options yet)"


# ----------------------------------------------------------------------------- main


def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=[k for k in PRESETS if k != "quick"], default="1GB")
    ap.add_argument("--quick", action="store_true", help="a ~40 MB model and a tiny codec model: well under a minute")
    ap.add_argument("--layers", type=int, help="override the preset's layer count")
    ap.add_argument("--hidden", type=int, help="override the preset's hidden size (intermediate scales with it)")
    ap.add_argument("--shard-gb", type=float, help="max shard size of the generated checkpoints (GB)")
    ap.add_argument("--alpha", type=float, default=0.8, help="weight of the finetuned model (default 0.8)")
    ap.add_argument("--delta-rel", type=float, default=1e-3,
                    help="per-element delta std relative to the tensor's rms (default 1e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="where models, bank and outputs go (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--no-peers", action="store_true", help="skillbank only: no plain script, mergekit or cp")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--mergekit-yaml", default=None,
                    help="mergekit-yaml executable (default: $MERGEKIT_YAML, else on PATH)")
    ap.add_argument("--no-codecs", action="store_true", help="skip the codec table")
    ap.add_argument("--cache", choices=["cold", "warm"], default=None,
                    help="cold: drop the page cache before every run (needs root); warm: read inputs first "
                         "(default: cold, warm with --quick)")
    ap.add_argument("--idle-wait", type=float, default=None,
                    help="wait up to this many s for other processes to go quiet before each run "
                         "(default 120, 0 with --quick)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure every row this many times (fresh bank each round) and report the median")
    ap.add_argument("--nice", type=int, default=0,
                    help="run every measured command under `nice -n N` (e.g. -20 as root on a shared machine)")
    ap.add_argument("--disk-budget-gb", type=float, default=45.0,
                    help="delete inputs as soon as they are no longer needed when the run would exceed this")
    ap.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    preset = "quick" if args.quick else args.size
    p = dict(PRESETS[preset])
    if args.hidden:
        ratio = p["intermediate"] / p["hidden"]
        p["hidden"] = args.hidden
        p["intermediate"] = int(round(args.hidden * ratio / 16)) * 16
        p["heads"] = max(1, args.hidden // 128)
    if args.layers:
        p["layers"] = args.layers
    if args.shard_gb:
        p["shard_bytes"] = int(args.shard_gb * GB)
    shape = ModelShape(**p)
    cache = args.cache or ("warm" if args.quick else "cold")
    idle_wait = args.idle_wait if args.idle_wait is not None else (0.0 if args.quick else 120.0)
    alpha = args.alpha

    made_work = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="merge-bench-")) if made_work else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base_dir, ft_dir, bank = work / "base", work / "ft", work / "bank"
    for d in (base_dir, ft_dir, bank):
        if d.exists():
            shutil.rmtree(d)

    log("# skillbank merge benchmark")
    log(f"command: {shlex.join([sys.executable, *sys.argv])}")
    log(f"date: {dt.datetime.now().isoformat(timespec='seconds')}")
    mi = machine_info(work)
    log(f"machine: {mi['cpu']}, {mi['cores']} cores, {mi['ram_gib']:.1f} GiB RAM, "
        f"{mi['disk_free_gb']:.0f} GB free at {work}; Linux {mi['kernel']}")
    log(f"software: python {mi['python']}, torch {mi['torch']}, safetensors {mi['safetensors']}, "
        f"skillbank {mi['skillbank']} ({code_fingerprint()})")
    log(f"load average at start: {' '.join(f'{x:.2f}' for x in mi['loadavg'])}")
    sb = skillbank_cmd()
    log(f"skillbank executor options: {executor_options(sb)}")

    nshards = len(shape.shard_names())
    model_b = shape.nbytes
    log(f"\n## model ({preset}{', overridden' if (args.hidden or args.layers or args.shard_gb) else ''})")
    log(f"Llama-style: hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} layers, "
        f"vocab {shape.vocab}, {len(shape.tensors())} tensors; {shape.params / 1e9:.3f} B params, "
        f"{model_b / GB:.2f} GB bf16 per model, {nshards} shard(s)"
        f"{' + model.safetensors.index.json' if nshards > 1 else ''} (max {shape.shard_bytes / GB:g} GB)")

    # disk: base + ft + bank (base copy + task vector, estimated <= 0.6 model) + one output at a time.
    # Lean: peers run first (base + ft + output), the base goes after init (base + ft + bank at init),
    # the finetuned model after add-skill (bank + task vector + output at checkout): at most 3 models.
    naive_peak = model_b * (4 + 0.6)
    lean = naive_peak > args.disk_budget_gb * GB
    need = model_b * 3.05 if lean else naive_peak
    if shutil.disk_usage(work).free < need + 2 * GB:
        log(f"error: needs about {need / GB:.0f} GB free at {work}, has {shutil.disk_usage(work).free / GB:.0f} GB")
        return 1
    log(f"disk plan: peak about {need / GB:.1f} GB"
        + (" (lean: the base is deleted after init and the finetuned model after add-skill; peers run first)"
           if lean else ""))

    t = time.perf_counter()
    gs = generate(shape, base_dir, ft_dir, args.seed, args.delta_rel)
    log(f"generated base and finetuned in {time.perf_counter() - t:.1f}s (not measured): finetuned = base + "
        f"N(0, ({args.delta_rel:g} * rms)^2) per element, seed {args.seed}; after bf16 rounding "
        f"||ft - base|| / ||base|| = {math.sqrt(gs.delta_sq / gs.base_sq):.2e}, "
        f"{100 * gs.changed / gs.elems:.1f}% of elements changed")

    names = sample_names(shape)
    sb_, sf = read_samples(base_dir, names), read_samples(ft_dir, names)
    ref = {k: ((1 - alpha) * sb_[k].float() + alpha * sf[k].float()).to(torch.bfloat16) for k in names}
    ref_sb = {k: torch.add(sb_[k].float(), torch.mul(torch.sub(sf[k].float(), sb_[k].float()),
                                                    torch.tensor(alpha))).to(torch.bfloat16) for k in names}
    checks: dict[str, tuple[int, int, float]] = {}

    runner = Runner(work, cache, idle_wait, args.nice)
    log(f"\n## runs\n{runner.describe()}; other processes' CPU share is measured during every run"
        + (f"; before each run waits up to {idle_wait:g}s for the machine to go quiet" if idle_wait else ""))
    env = dict(os.environ, SKILLBANK_AUTHOR="merge-bench", PYTHONUNBUFFERED="1")
    runs: dict[str, list[Row]] = {}
    mk = None if args.no_mergekit else (args.mergekit_yaml or os.environ.get("MERGEKIT_YAML")
                                          or shutil.which("mergekit-yaml"))
    if not args.no_peers and not mk:
        why = "--no-mergekit" if args.no_mergekit else \
            "mergekit-yaml not found (pip install mergekit, or pass --mergekit-yaml / $MERGEKIT_YAML)"
        log(f"mergekit: skipped: {why}")
    repeat = max(1, args.repeat)
    if lean and repeat > 1:
        log("--repeat ignored: the lean disk plan deletes the inputs during the first round")
        repeat = 1
    script = work / "plain_merge.py"
    script.write_text(PLAIN_PEER)
    cfg = work / "mergekit.yml"
    cfg.write_text(mergekit_config(base_dir, ft_dir, alpha))
    shard_params = max(1, shape.shard_bytes // 2)
    tv_note, bank_b = "", 0

    def out_dir(name: str) -> Path:
        d = work / name
        if d.exists():
            shutil.rmtree(d)
        return d

    def measure(key: str, label: str, argv: list[str], inputs: list[Path], env=None) -> Row:
        r = runner.run(label, argv, model_b, inputs, env=env)
        runs.setdefault(key, []).append(r)
        return r

    for rnd in range(repeat):
        if repeat > 1:
            log(f"round {rnd + 1} of {repeat}")
        last = rnd == repeat - 1
        if not args.no_peers:
            o = out_dir("out-cp")
            measure("cp", "cp (finetuned weights)", ["cp", "-r", str(ft_dir), str(o)], [ft_dir])
            shutil.rmtree(o, ignore_errors=True)

            o = out_dir("out-plain")
            r = measure("plain", "plain safetensors script",
                        [sys.executable, str(script), str(base_dir), str(ft_dir), str(o), f"{alpha}"],
                        [base_dir, ft_dir])
            if r.ok and last:
                checks["plain"] = compare(read_samples(o, names), ref)
            shutil.rmtree(o, ignore_errors=True)

            if mk:
                o = out_dir("out-mergekit")
                r = measure("mergekit", "mergekit linear",
                            [mk, str(cfg), str(o), "--lazy-unpickle", "--no-cuda", "--no-copy-tokenizer", "--quiet",
                             "--out-shard-size", f"{shard_params // 1_000_000}M"], [base_dir, ft_dir])
                if r.ok and last:
                    checks["mergekit"] = compare(read_samples(o, names), ref)
                shutil.rmtree(o, ignore_errors=True)

        if bank.exists():
            shutil.rmtree(bank)
        g = ["--bank", str(bank)]
        measure("init", "skillbank init", [*sb, *g, "init", "--base", str(base_dir), "--json"], [base_dir], env)
        if lean:
            shutil.rmtree(base_dir)
        r = measure("add", "skillbank add-skill",
                    [*sb, *g, "add-skill", "s", "--finetuned", str(ft_dir), "--alpha", f"{alpha}", "--json"],
                    [bank, ft_dir], env)
        if r.ok:
            try:
                d = json.loads(r.stdout)
                tv_note = (f"task vector ({d.get('codec')}): {d['stored_bytes'] / MB:.1f} MB stored for "
                           f"{d['raw_bytes'] / MB:.1f} MB raw ({d['raw_bytes'] / max(d['stored_bytes'], 1):.2f}x "
                           "smaller)")
            except (ValueError, KeyError):
                pass
        if lean:
            shutil.rmtree(ft_dir)
        o = out_dir("out-skillbank")
        r = measure("checkout", "skillbank checkout", [*sb, *g, "checkout", "v1", "--out", str(o), "--json"],
                    [bank], env)
        if r.ok and last:
            got = read_samples(o, names)
            checks["skillbank"] = compare(got, ref)
            checks["skillbank vs its own formula"] = compare(got, ref_sb)
        bank_b = dir_bytes(bank)
        shutil.rmtree(o, ignore_errors=True)

    def median_row(rs: list[Row]) -> Row:
        good = sorted((r for r in rs if r.ok), key=lambda r: r.total)
        return good[(len(good) - 1) // 2] if good else rs[-1]

    rows = {k: median_row(v) for k, v in runs.items()}

    # ------------------------------------------------------------------ report
    order = [k for k in ("init", "add", "checkout", "plain", "mergekit", "cp") if k in rows]
    co = rows["checkout"]
    ad = rows["add"]
    table = []

    def best(k: str) -> float:
        return min(x.total for x in runs[k] if x.ok)

    for k in order:
        r = rows[k]
        if k in ("plain", "mergekit", "cp") and co.ok and r.ok:
            vs = f"{r.total / co.total:.2f}x checkout"
            if repeat > 1:
                vs += f" (best/best {best(k) / best('checkout'):.2f}x)"
            if k == "plain" and ad.ok:
                vs += f"; {r.total / ad.total:.2f}x add-skill"
                if repeat > 1:
                    vs += f" (best/best {best(k) / best('add'):.2f}x)"
        else:
            vs = "-" if r.ok else r.note
        tot = sorted(x.total for x in runs[k] if x.ok)
        rng = [f"{tot[0]:.2f}-{tot[-1]:.2f}" if len(tot) > 1 else "-"] if repeat > 1 else []
        table.append([r.label, f"{r.wall:.2f}", f"{r.sync:.2f}", f"{r.total:.2f}", *rng,
                      f"{max(x.rss_mb for x in runs[k]):,.0f}", f"{r.gbps:.3f}" if r.ok else "-", f"{r.cpu_s:.1f}",
                      f"{100 * r.other_cpu:.0f}%", vs])
    log(f"\n## results: {preset}, {shape.params / 1e9:.2f} B params, {model_b / GB:.2f} GB per model, "
        f"{nshards} shard(s), alpha {alpha:g}")
    log(fmt_table(["run", "wall s", "sync s", "total s", *([f"range of {repeat}"] if repeat > 1 else []),
                   "peak RSS MB", "GB/s", "cpu s", "other cpu", "peer time / skillbank time"], table))
    if repeat > 1:
        log(f"each row: the run with the median total of {repeat} rounds (range: min-max total s; "
            "peak RSS: the highest of all rounds); ratios: median/median, and best/best (least disturbed)")
    log(f"GB/s = {model_b / GB:.2f} GB of model weights / total s (wall + trailing sync). 'other cpu' = share "
        f"of the machine's {os.cpu_count()} cores used by other processes during the run. Peers never fsync; "
        "skillbank fsyncs its objects and outputs itself, and the trailing `sync` charges the peers for theirs.")
    if tv_note:
        log(tv_note + f"; bank on disk {bank_b / GB:.2f} GB")
    if checks:
        log("sampled check (first <=4M elements of 6 tensors) against the fp32 reference (1-a)*base + a*ft in bf16:")
        for k, (dif, tot, worst) in checks.items():
            log(f"  {k}: {dif} of {tot} elements differ" + (f" (max |diff| {worst:.3g})" if dif else " (identical)"))
    cold_ok = runner.cold
    if not cold_ok:
        log("NOTE: runs are WARM-cache (page cache could not be dropped or --cache warm).")

    codec_rows, cinfo = ([], {}) if args.no_codecs else codec_table(args.quick, args.seed)
    if codec_rows:
        log(f"\n## codecs on a realistic task vector\n{cinfo['model']}, {cinfo['params'] / 1e6:.2f} M params; "
            f"{cinfo['recipe']}; trained in {cinfo['train_s']:.0f}s (not measured)")
        log(f"task vector: ||ft - base|| / ||base|| = {cinfo['rel_norm']:.2e}, {100 * cinfo['changed']:.1f}% of "
            f"bf16 elements changed, {cinfo['raw_bytes'] / MB:.2f} MB raw bf16 in {cinfo['blocks']} blocks")
        ct = []
        for r in codec_rows:
            if "error" in r:
                ct.append([r["codec"], "-", "-", "-", "-", "-", r["error"][:80]])
            else:
                ct.append([r["codec"], "yes" if r["lossless"] else "no", f"{r['ratio']:.3f}", f"{r['smaller']:.2f}x",
                           f"{r['enc_gbps']:.3f}", f"{r['dec_gbps']:.3f}", f"{r['rel_error']:.2e}"])
        log(fmt_table(["codec", "lossless", "stored / raw", "smaller", "encode GB/s", "decode GB/s",
                       "rel. error"], ct))
        log("ratios vs the raw bf16 task vector; GB/s of raw task-vector bytes, one thread (torch.set_num_threads(1)), "
            "block by block as the engine calls them; rel. error = ||decoded - ft|| / ||ft - base||.")

    log(f"\ncode at end: {code_fingerprint()}")
    log(f"total benchmark time {time.perf_counter() - started:.0f}s")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "command": [sys.executable, *sys.argv], "machine": mi, "model": {**p, "params": shape.params,
                                                                          "bytes": model_b, "shards": nshards},
            "cold_cache": cold_ok,
            "rows": {k: [{"label": r.label, "argv": r.argv, "ok": r.ok, "wall": r.wall, "sync": r.sync,
                          "rss_mb": r.rss_mb, "gbps": r.gbps, "cpu_s": r.cpu_s, "other_cpu": r.other_cpu}
                         for r in v] for k, v in runs.items()},
            "checks": checks, "codecs": codec_rows, "codec_model": cinfo}, indent=2, default=str))
    if args.keep:
        log(f"kept {work}")
    else:
        for d in (base_dir, ft_dir, bank):
            shutil.rmtree(d, ignore_errors=True)
        if made_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(rows[k].ok for k in ("init", "add", "checkout")) else 1


if __name__ == "__main__":
    sys.exit(main())
