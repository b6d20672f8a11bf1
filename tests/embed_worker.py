"""One rank of the sharded-embedding tests (``test_embed_sharded.py``): the ``rela-train`` command
line, optionally parked at a point where the test SIGKILLs it.

    python embed_worker.py PARK READY -- embed ARGS...

PARK is ``none``, ``inside-commit:K`` (park once the rows of this rank's K-th chunk are durable,
before its journal claims them) or ``between:K`` (park after its K-th chunk is claimed). On
parking the rank writes the file READY and sleeps; its heartbeat goes on, so the other ranks
wait for it until the test kills it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _park(ready: str) -> None:
    Path(ready).write_text("parked")
    time.sleep(120)  # the test kills us here


def main() -> int:
    park, ready, separator, *argv = sys.argv[1:]
    assert separator == "--", sys.argv
    if park != "none":
        from rela_kernels import store as store_module

        where, count = park.split(":")
        limit = int(count)
        original = store_module._append_journal
        claimed = [0]

        def append(fd: int, record) -> None:
            if where == "inside-commit" and claimed[0] == limit - 1:
                _park(ready)
            original(fd, record)
            claimed[0] += 1
            if where == "between" and claimed[0] == limit:
                _park(ready)

        store_module._append_journal = append
    from rela_train.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
