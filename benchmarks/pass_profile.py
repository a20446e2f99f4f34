"""Where one `skillbank checkout` spends its CPU: per-stage thread CPU time of the streaming pass.

Runs the real CLI in this process with the pass's stage functions wrapped (nothing in skillbank
changes), then prints the CPU seconds each stage used summed over the threads that ran it, the
wall time of the pass and of the whole command, and the process's user / system CPU.

    python benchmarks/merge_bench.py --size 4GB --no-peers --no-codecs --keep --workdir W
    python benchmarks/pass_profile.py --cold -- --bank W/bank checkout v1 --out W/out --json

--cold drops the page cache first (root only), as merge_bench does before every measured run.
A stage's CPU includes the page faults it takes (first touches of mapped or fresh memory).
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import redirect_stdout

T0 = time.perf_counter()
gc.disable()  # as the console script does (skillbank/entry.py)
import skillbank.codecs.container as container  # noqa: E402
import skillbank.merge.engine as engine  # noqa: E402
import skillbank.store.verify as verify  # noqa: E402
import skillbank.tensors.reader as reader  # noqa: E402
import skillbank.tensors.writer as writer  # noqa: E402
from skillbank.cli import main as cli_main  # noqa: E402

gc.freeze()
gc.enable()
IMPORTED = time.perf_counter()

STAGES = [  # (object, attribute, label): what each stage of the pass calls
    (reader.SafetensorsFile, "read", "read base block"),
    (container.TaskVectorReader, "decode", "decode task vector"),
    (engine, "_merge", "merge kernel"),
    (engine, "rebuild_piece", "rebuild (read + decode + merge)"),
    (writer.WeightsDigest, "update", "weights digest"),
    (writer.CheckpointWriter, "write", "write output"),
    (verify.BackgroundCheck, "_run", "verify inputs (background hash)"),
    (engine, "materialize", "pass (wall)"),
]


def instrument() -> tuple[Counter, Counter]:
    cpu, wall = Counter(), Counter()
    lock = threading.Lock()
    for obj, name, label in STAGES:
        real = getattr(obj, name)

        def wrapped(*a, _real=real, _label=label, **kw):
            c, w = time.thread_time(), time.perf_counter()
            try:
                return _real(*a, **kw)
            finally:
                with lock:
                    cpu[_label] += time.thread_time() - c
                    wall[_label] += time.perf_counter() - w

        setattr(obj, name, wrapped)
    # The API imported `materialize` by name before it was wrapped.
    import skillbank.api as api

    api.materialize = engine.materialize
    return cpu, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="drop the page cache first (root)")
    ap.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the skillbank arguments")
    args = ap.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if "checkout" not in argv:
        ap.error("give a checkout command after --")
    if "--out" in argv:
        shutil.rmtree(argv[argv.index("--out") + 1], ignore_errors=True)
    if args.cold:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    cpu, wall = instrument()
    start = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    sys.argv = ["skillbank", *argv]
    with redirect_stdout(open(os.devnull, "w")):
        cli_main()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    end = time.perf_counter()
    print(f"command: {' '.join(sys.argv)}  ({'cold' if args.cold else 'warm'} page cache)")
    print(f"imports {IMPORTED - T0:.2f} s; command {end - start:.2f} s wall, "
          f"{r1.ru_utime - r0.ru_utime:.2f} s user + {r1.ru_stime - r0.ru_stime:.2f} s system CPU")
    print(f"{'stage':34} {'CPU s':>7} {'wall s (summed over threads)':>30}")
    for _, _, label in STAGES:
        print(f"{label:34} {cpu[label]:7.2f} {wall[label]:30.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
