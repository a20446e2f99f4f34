"""Fuzz the parsers that read bytes a user, a remote or a damaged disk controls.

Targets: the safetensors reader (skillbank.tensors.reader), the task-vector container
(skillbank.codecs.container) and every codec's decoder (skillbank.codecs). Inputs are valid files
damaged by hypothesis (stress/fuzz_inputs.py). The property, for every case:

- the only outcomes are a clean result or a SkillbankError whose message is one line;
- a clean result is sound: accepted tensors lie inside the data section and torch can hold them,
  decoded blocks have the parent block's shape and dtype;
- no read strays outside its bounds (file size, or the data / block region once a header or
  footer was accepted): os.pread and os.preadv are wrapped to check every request;
- no huge allocation (each target runs in a subprocess under RLIMIT_AS: its size after start-up
  plus --mem-mb) and no hang (--case-timeout seconds per case, then the whole target's timeout).

    python stress/fuzz.py                        # the CI size (tests/test_fuzz.py): 300 per target
    python stress/fuzz.py --examples 20000       # a longer run
    python stress/fuzz.py --targets codecs --examples 5000 --seed 7 --save /tmp/fuzz-fails

Exit status 0 when every case behaved, 1 otherwise; `--json` prints the summary as JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("safetensors", "container", "codecs")
PROBE_SLACK = 16  # a fixed-size probe (the 8-byte length) may ask past the end of a short file


class CaseTimeout(BaseException):
    """BaseException: code under test that catches Exception must not swallow it."""


class OutOfBounds(Exception):
    pass


# ----------------------------------------------------------------------------- read bounds

class Bounds:
    """Wraps os.pread / os.preadv: every request must lie inside its file, or inside the region a
    parser has accepted (data section, block region) once one is registered for the descriptor."""

    def __init__(self):
        self.region: dict[int, tuple[int, int]] = {}
        self._pread, self._preadv = os.pread, os.preadv
        os.pread, os.preadv = self.pread, self.preadv

    def check(self, fd: int, offset: int, n: int) -> None:
        if fd in self.region:
            lo, hi = self.region[fd]
            if not lo <= offset <= offset + n <= hi:
                raise OutOfBounds(f"read of {n} bytes at {offset} outside the accepted region [{lo}, {hi})")
            return
        size = os.fstat(fd).st_size
        if offset < 0 or (offset + n > size and n > PROBE_SLACK):
            raise OutOfBounds(f"read of {n} bytes at {offset} outside the {size}-byte file")

    def pread(self, fd, n, offset):
        self.check(fd, offset, n)
        return self._pread(fd, n, offset)

    def preadv(self, fd, buffers, offset, *flags):
        self.check(fd, offset, sum(memoryview(b).nbytes for b in buffers))
        return self._preadv(fd, buffers, offset, *flags)


# ----------------------------------------------------------------------------- outcomes

def normalise(msg: str) -> str:
    """Group messages that differ only in paths, digests, names and numbers."""
    msg = re.sub(r"(?<![\w.])/[^\s:'\"(),]+", "<path>", msg)
    msg = re.sub(r"\b[0-9a-f]{32,64}\b", "<digest>", msg)
    msg = re.sub(r"\b0x[0-9a-fA-F]+|\\x[0-9a-fA-F]{2}", "N", msg)
    msg = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "<q>", msg)
    return re.sub(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", "N", msg)


class Tally:
    def __init__(self, target: str, case_timeout: float, save: Path | None):
        self.target, self.case_timeout, self.save = target, case_timeout, save
        self.cases = self.ops = self.clean = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.unexpected: list[dict] = []
        self.current: tuple[str, bytes] = ("", b"")

    def case(self, what: str, data: bytes) -> None:
        """A new input, fully drawn: count it and remember it for the report."""
        self.cases += 1
        self.current = (what, data)

    def op(self, fn, error_types) -> object | None:
        """Run one parser call; returns its result, or None when it refused the input."""
        self.ops += 1
        signal.setitimer(signal.ITIMER_REAL, self.case_timeout)
        try:
            result = fn()
            self.clean += 1
            return result
        except error_types as e:
            text = str(e)
            if "\n" in text or not text.strip():
                self._unexpected("MultiLineMessage", repr(text))
            self.errors[normalise(text)] += 1
        except CaseTimeout:
            self._unexpected("Hang", f"no outcome within {self.case_timeout} s")
        except Exception as e:  # MemoryError, RecursionError, OutOfBounds, AssertionError, ...
            self._unexpected(type(e).__name__, str(e)[:300])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return None

    def _unexpected(self, kind: str, message: str) -> None:
        what, data = self.current
        entry = {"type": kind, "message": message, "input": what, "bytes": len(data)}
        if self.save is not None and len(self.unexpected) < 50:
            self.save.mkdir(parents=True, exist_ok=True)
            path = self.save / f"{self.target}-{len(self.unexpected)}.bin"
            path.write_bytes(data)
            entry["saved"] = str(path)
        self.unexpected.append(entry)

    def summary(self, seconds: float) -> dict:
        return {"target": self.target, "cases": self.cases, "ops": self.ops, "clean": self.clean,
                "refused": sum(self.errors.values()), "distinct_errors": len(self.errors),
                "errors": dict(self.errors.most_common()), "unexpected": self.unexpected,
                "seconds": round(seconds, 1)}


def limit_memory(headroom_mb: int) -> None:
    """RLIMIT_AS = what the process maps now + headroom: a huge allocation fails, visibly."""
    pages = int(Path("/proc/self/statm").read_text().split()[0])
    now = pages * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = now + headroom_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


# ----------------------------------------------------------------------------- targets

class _PathStore:
    """The one ObjectStore method TaskVectorReader needs: no hashing, no fsync per case."""

    def __init__(self, path: Path):
        self._path = path

    def open_verified(self, digest: str) -> Path:
        return self._path


def target_safetensors(tally: Tally, bounds: Bounds, tmp: Path):
    from hypothesis import strategies as st

    import fuzz_inputs as fi
    from skillbank.errors import SkillbankError
    from skillbank.tensors.dtypes import to_torch
    from skillbank.tensors.reader import SafetensorsFile
    from skillbank.tensors.writer import TensorSpec, header_bytes

    fi.safetensors_seeds_cached()
    path = tmp / "fuzz.safetensors"

    def body(data):
        what, raw = data.draw(fi.safetensors_input())
        path.write_bytes(raw)
        tally.case(what, raw)
        f = tally.op(lambda: SafetensorsFile(path), SkillbankError)
        if f is None:
            return
        try:
            (n,) = struct.unpack("<Q", raw[:8])
            bounds.region[f._fd] = (8 + n, len(raw))
            for info in f.tensors.values():
                def read(info=info):
                    assert 8 + n <= info.start <= info.end <= len(raw), f"{info} lies outside the data"
                    t = f.read(info)
                    assert t.numel() == info.numel and t.dtype == to_torch(info.dtype), info
                    t.reshape(info.shape)  # an accepted shape is one torch can hold
                    if info.numel > 1:
                        assert f.read(info, info.numel // 2, 1).numel() == 1
                    header_bytes([TensorSpec(info.name, info.dtype, info.shape)])  # and write back out
                tally.op(read, SkillbankError)
        finally:
            bounds.region.pop(f._fd, None)
            f.close()

    return body, st.data()


def target_container(tally: Tally, bounds: Bounds, tmp: Path):
    from hypothesis import strategies as st

    import fuzz_inputs as fi
    from skillbank.codecs import CODECS, TaskVectorReader
    from skillbank.codecs.container import MAGIC
    from skillbank.errors import SkillbankError

    for name in CODECS:
        fi.container_seed_cached(name)
    path = tmp / "fuzz.sbtv"
    store = _PathStore(path)

    def body(data):
        raw, plan, what = data.draw(fi.container_input())
        path.write_bytes(raw)
        tally.case(what, raw)
        r = tally.op(lambda: TaskVectorReader(store, "0" * 32), SkillbankError)
        if r is None:
            return
        try:
            (footer_len, _) = fi.TAIL.unpack(raw[-fi.TAIL.size:])
            bounds.region[r._fd] = (len(MAGIC), len(raw) - fi.TAIL.size - footer_len)
            name0, _, parent0 = plan[0]
            probes = [("no.such.tensor", 0, parent0), (name0, 99, parent0), (name0, -1, parent0)]
            for name, block, parent in plan + probes:
                def decode(name=name, block=block, parent=parent):
                    out = r.decode(name, block, parent)
                    assert out.shape == parent.shape and out.dtype == parent.dtype, (out.shape, out.dtype)
                tally.op(decode, SkillbankError)
        finally:
            bounds.region.pop(r._fd, None)
            r.close()

    return body, st.data()


def target_codecs(tally: Tally, bounds: Bounds, tmp: Path):
    from hypothesis import strategies as st

    import fuzz_inputs as fi
    from skillbank.errors import SkillbankError

    def body(data):
        name, codec, parent, blob, what = data.draw(fi.codec_input())
        tally.case(f"{name} {what}", blob)

        def decode():
            out = codec.decode(blob, parent)
            assert out.shape == parent.shape and out.dtype == parent.dtype, (out.shape, out.dtype)
            if hasattr(codec, "decode_delta"):
                delta = codec.decode_delta(blob, parent)
                assert delta is None or delta.numel() == parent.numel()
        tally.op(decode, SkillbankError)

    return body, st.data()


BODIES = {"safetensors": target_safetensors, "container": target_container, "codecs": target_codecs}


def run_worker(target: str, examples: int, seed: int, mem_mb: int, case_timeout: float,
               save: Path | None) -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "stress")]
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    torch.set_num_threads(1)

    def on_alarm(signum, frame):
        raise CaseTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    tally = Tally(target, case_timeout, save)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as tmp:
        body, strategy = BODIES[target](tally, Bounds(), Path(tmp))
        limit_memory(mem_mb)

        @hseed(seed)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(data):
            body(data)

        start = time.perf_counter()
        run()
        return tally.summary(time.perf_counter() - start)


# ----------------------------------------------------------------------------- driver

def run_target(target: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", target, "--examples", str(args.examples),
           "--seed", str(args.seed), "--mem-mb", str(args.mem_mb), "--case-timeout", str(args.case_timeout)]
    if args.save:
        cmd += ["--save", str(args.save)]
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"target": target, "crashed": f"no result within {args.timeout} s", "cases": 0}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"target": target, "crashed": f"exit {proc.returncode}:\n{tail}", "cases": 0}
    result = json.loads(lines[-1])
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    return result


def report(results: list[dict], top: int) -> None:
    print(f"{'target':<12} {'cases':>7} {'ops':>7} {'clean':>7} {'refused':>8} {'distinct':>8} "
          f"{'unexpected':>10} {'seconds':>8}")
    for r in results:
        if "crashed" in r:
            print(f"{r['target']:<12} CRASHED {r['crashed']}")
            continue
        print(f"{r['target']:<12} {r['cases']:>7} {r['ops']:>7} {r['clean']:>7} {r['refused']:>8} "
              f"{r['distinct_errors']:>8} {len(r['unexpected']):>10} {r['seconds']:>8}")
    for r in results:
        if "crashed" in r:
            continue
        print(f"\n{r['target']}: {r['distinct_errors']} distinct error messages"
              + (f" (the {top} most frequent)" if r["distinct_errors"] > top else ""))
        for msg, n in list(r["errors"].items())[:top]:
            print(f"  {n:>6}  {msg[:150]}")
        for u in r["unexpected"][:20]:
            print(f"  UNEXPECTED {u['type']}: {u['message'][:200]} [input: {u['input']}, {u['bytes']} bytes"
                  + (f", saved {u['saved']}" if u.get("saved") else "") + "]")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=300, help="hypothesis examples per target")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-mb", type=int, default=1024, help="address space allowed above start-up")
    p.add_argument("--case-timeout", type=float, default=20.0, help="seconds one parser call may take")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one target may take")
    p.add_argument("--save", type=Path, default=None, help="write inputs that misbehaved here")
    p.add_argument("--top", type=int, default=25, help="error messages listed per target")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.examples, args.seed, args.mem_mb, args.case_timeout,
                                    args.save)))
        return 0
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}")
    start = time.perf_counter()
    results = [run_target(t, args) for t in targets]
    bad = any("crashed" in r or r["unexpected"] for r in results)
    if args.json:
        print(json.dumps({"results": results, "ok": not bad, "seconds": round(time.perf_counter() - start, 1)}))
    else:
        report(results, args.top)
        print(f"\n{sum(r.get('cases', 0) for r in results)} cases in {time.perf_counter() - start:.1f} s: "
              + ("all behaved" if not bad else "UNEXPECTED OUTCOMES"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
