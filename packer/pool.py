"""The worker processes that turn candidates into records, in input order.

Workers start by forkserver with the image stack preloaded: in milliseconds (spawn costs
~0.5 s each re-importing OpenCV) and, unlike plain fork, safe when the caller already runs
threads (torch, TensorFlow, a web server). `PACKER_START_METHOD` overrides. Like spawn,
forkserver re-imports the caller's main script in every worker, so a script calling
`build_dataset()` needs `if __name__ == "__main__":`; without it the worker stops at once
with that advice (`refuse_script_reimport`) and the parent raises `WorkerDied`, whose message
gives the advice too unless packer's own command line is running.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from packer.errors import DataFailed
from packer.sample import ProcessOptions, SampleResult, process_candidate
from packer.sources.base import Candidate

CHUNK = 4  # candidates per task sent to a worker: amortizes IPC without hurting order
_REIMPORT = ("_fixup_main_from_path", "_fixup_main_from_name")  # multiprocessing.spawn re-running __main__
GUARD_HINT = ('a script that calls build_dataset() with workers > 1 needs the call under '
              '`if __name__ == "__main__":` (each worker process re-imports the script), or workers=1')


class WorkerDied(DataFailed):
    """A worker process ended abruptly (killed, out of memory, or it failed to start): exit 1."""


def refuse_script_reimport() -> None:
    """Stop a worker that is re-importing the caller's script and reached build_dataset() again:
    one line of advice on stderr instead of a second build in every worker."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name in _REIMPORT and "multiprocessing" in f.f_code.co_filename:
            print(f"packer: error: {GUARD_HINT}", file=sys.stderr, flush=True)
            raise SystemExit(1)
        f = f.f_back


def start_pool(workers: int) -> cf.ProcessPoolExecutor:
    ctx = mp.get_context(os.environ.get("PACKER_START_METHOD", "forkserver"))
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["packer.sample", "packer.images"])
    return cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)


def _init_worker() -> None:
    import signal

    from packer.images import configure_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    configure_worker()  # the one place OpenCV's threads are set: one process per core already


def _process_chunk(chunk: list[Candidate], opts: ProcessOptions) -> list[SampleResult]:
    return [process_candidate(c, opts) for c in chunk]


def ordered_map(
    items: Sequence[Candidate], opts: ProcessOptions, workers: int, pool: cf.Executor | None
) -> Iterator[SampleResult]:
    """process_candidate over `items`, results in input order, at most ~4 chunks per worker in flight."""
    if pool is None or workers <= 1:
        for c in items:
            yield process_candidate(c, opts)
        return
    chunks = [list(items[i : i + CHUNK]) for i in range(0, len(items), CHUNK)]
    window = max(2, workers * 4)
    pending: list[cf.Future] = []
    it = iter(chunks)
    try:
        for chunk in it:
            pending.append(pool.submit(_process_chunk, chunk, opts))
            if len(pending) >= window:
                break
        while pending:
            done = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_process_chunk, nxt, opts))
            yield from _result(done)
    finally:
        for f in pending:
            f.cancel()


def _result(future: cf.Future) -> list[SampleResult]:
    try:
        return future.result()
    except BrokenProcessPool:
        why = "killed or out of memory" + ("" if _packer_is_main() else f"; or {GUARD_HINT}")
        raise WorkerDied(f"a worker process ended abruptly ({why}); rerun with --resume to keep the "
                         "finished shards") from None


def _packer_is_main() -> bool:
    """Whether the process runs packer's own command line (no user script to re-import)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return (spec is not None and spec.name.startswith("packer")) or Path(sys.argv[0]).name == "packer"
