"""The `skillbank` console script.

The CLI imports torch, SQLAlchemy and click: hundreds of thousands of objects that live until
exit. With the cyclic collector running, it rescans them again and again during the import and
once more at shutdown, about 0.7 s of every command on a laptop-class CPU. They are made
permanent (`gc.freeze`) before any command runs; the collector still runs for what the command
itself allocates.
"""

import gc


def main() -> None:
    gc.disable()
    try:
        from skillbank.cli import main as run
    finally:
        gc.freeze()
        gc.enable()
    run()
