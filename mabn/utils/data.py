"""Data pieces every trainer shares: exact evaluation shards (:class:`ShardSampler`), the per-rank
permutation stream that the training samplers deal from (:class:`RankPermutations`), the loader
workers' start method and SIGTERM policy (:func:`worker_options`), image files decoded by OpenCV
with one-line errors (:func:`load_bgr`), and generated datasets written once into the cache
(:func:`default_cache_dir`, :func:`build_once`).

**Loader workers** start from a ``forkserver`` (a clean single-threaded process that has imported
the trainer's data module once) instead of being forked from the trainer, which by then runs
threads (CUDA, OpenMP, NCCL, the pin-memory thread): forking a process with threads can leave a
lock held forever in the child. A script that builds loaders is imported again by the server, so
its entry point needs ``if __name__ == "__main__":``. Each worker runs one compute thread and
ends on a SIGTERM only when its owner (the process that built the loader) sends it: a scheduler
may send SIGTERM to every process of the job, and the trainer (which stops cleanly on it) must
keep its loader until it has saved, while the owner's own SIGTERM (DataLoader's ``terminate()``
of a stuck worker, ``multiprocessing``'s exit handler with a loader still open) must end the
worker so that the owner's exit never waits on it. Nothing else in the process is touched: no
exit handler, no other child. A worker whose owner is gone exits by itself (DataLoader's
watchdog).

numpy, OpenCV and PIL are imported inside the functions that use them, so that ``import mabn``
needs torch alone.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Tuple

from torch.utils.data import Sampler

from mabn.utils.errors import CorruptImageError, UserError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["RankPermutations", "ShardSampler", "build_once", "declared_size", "decode_failure", "default_cache_dir",
           "load_bgr", "opencv_max_pixels", "worker_context", "worker_options"]

_OPENCV_DEFAULT_MAX_PIXELS = 1 << 30


class ShardSampler(Sampler):
    """Indices ``rank, rank + world_size, ...`` below ``num_samples``: exact, uneven shards, so that
    evaluation reads every sample once over all ranks (nothing duplicated or dropped)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


class RankPermutations:
    """This rank's share of seeded permutations of ``range(num_samples)``: the core of the training
    samplers (``cls``'s per-epoch :class:`~cls.data.TrainBatchSampler`, ``det``'s iteration-based
    :class:`~det.data.samplers.IterationBatchSampler`).

    The dataset is visited in passes. Pass ``p`` of the stream named ``key`` (a tuple of ints,
    e.g. ``(seed,)`` or ``(seed, epoch)``) is the permutation drawn from
    ``numpy.random.default_rng([*key, p])``, cut to a multiple of the world size and dealt
    round-robin to the ranks: within a pass no sample goes to two ranks or twice to one, and
    every rank gets ``num_samples // world_size`` samples. :class:`UserError` when there are
    fewer samples than ranks.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        if num_samples < world_size:
            raise UserError(f"the training set has {num_samples} images, fewer than the {world_size} processes")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.per_pass = num_samples // world_size

    def share(self, key: Sequence[int], pass_index: int) -> np.ndarray:
        """This rank's ``per_pass`` indices of pass ``pass_index`` of stream ``key``, in order."""
        import numpy as np

        order = np.random.default_rng([*key, pass_index]).permutation(self.num_samples)
        return order[:self.per_pass * self.world_size][self.rank::self.world_size]

    def stream(self, key: Sequence[int]) -> Iterator[int]:
        """This rank's endless sequence of indices (Python ints) of stream ``key``, pass after pass."""
        pass_index = 0
        while True:
            yield from self.share(key, pass_index).tolist()
            pass_index += 1

    def head(self, key: Sequence[int], count: int) -> np.ndarray:
        """The first ``count`` indices of stream ``key`` (as many passes as that takes)."""
        import numpy as np

        passes = -(-count // self.per_pass)
        if passes <= 0:
            return np.zeros(0, np.int64)
        return np.concatenate([self.share(key, p) for p in range(passes)])[:count]


def _worker_init(owner_pid: int, _worker_id: int) -> None:
    """A loader worker's start (see the module doc): one compute thread; SIGTERM blocked and taken
    by a watcher thread that ends the worker only when ``owner_pid`` sent it. Without
    ``sigwaitinfo`` (macOS) every SIGTERM is ignored."""
    import torch

    try:
        import cv2
    except ImportError:  # a trainer without OpenCV
        pass
    else:
        cv2.setNumThreads(1)
    torch.set_num_threads(1)
    if not hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    # Blocked in this thread and in every thread started after it; the watcher takes it instead.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_on_sigterm_from, args=(owner_pid,), name="sigterm-watch", daemon=True).start()


def _exit_on_sigterm_from(owner_pid: int) -> None:
    """Wait for a SIGTERM sent by ``owner_pid`` (sender pids from ``sigwaitinfo``), then exit with
    status 0 (the owner's SIGCHLD check reports only failures)."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != owner_pid:
        pass
    os._exit(0)


def worker_context(preload: Sequence[str] = ()) -> multiprocessing.context.BaseContext:
    """The ``forkserver`` context of the loader workers; the server imports the modules ``preload``
    (the trainer's data module: torch, OpenCV, ...) once, so that each worker starts without
    importing them again. As with ``spawn``, a script run as ``__main__`` is imported again by
    the server: guard its entry point with ``if __name__ == "__main__":``."""
    context = multiprocessing.get_context("forkserver")
    if preload:
        context.set_forkserver_preload(list(preload))
    return context


def worker_options(num_workers: int, preload: Sequence[str] = ()) -> dict:
    """``DataLoader`` keyword arguments for ``num_workers`` workers started as the module doc says
    (``forkserver`` preloading ``preload``, the SIGTERM policy bound to this process as owner);
    ``num_workers`` alone for 0 (loading in this process)."""
    if num_workers <= 0:
        return {"num_workers": num_workers}
    return {"num_workers": num_workers, "worker_init_fn": functools.partial(_worker_init, os.getpid()),
            "multiprocessing_context": worker_context(preload)}


def opencv_max_pixels() -> int:
    """The most pixels OpenCV decodes: ``$OPENCV_IO_MAX_IMAGE_PIXELS`` (read by OpenCV at its first
    decode), 2^30 by default."""
    try:
        return int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", _OPENCV_DEFAULT_MAX_PIXELS))
    except ValueError:
        return _OPENCV_DEFAULT_MAX_PIXELS


def declared_size(path: str) -> Tuple[Optional[Tuple[int, int]], bool]:
    """``((width, height) or None, too_large_for_pil)`` from the file header, without decoding."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size, False
    except Image.DecompressionBombError:
        return None, True
    except (OSError, ValueError, SyntaxError, EOFError):
        return None, False


def decode_failure(path: str) -> str:
    """Why OpenCV returned no image for ``path``: too many pixels, or a corrupt file."""
    size, over_pil_limit = declared_size(path)
    limit = opencv_max_pixels()
    if size is not None and size[0] * size[1] > limit:
        declared = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels"
    elif over_pil_limit:
        from PIL import Image

        declared = f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels"
    else:
        return f"cannot decode image file {path!r} (corrupt or not an image)"
    return (f"image file {path!r} is too large to decode ({declared}; OpenCV decodes at most {limit}): "
            f"downscale it, or set OPENCV_IO_MAX_IMAGE_PIXELS higher if there is memory for it")


def load_bgr(path: str) -> np.ndarray:
    """Decode an image file into an (H, W, 3) BGR uint8 array; :class:`CorruptImageError` naming the
    file and the problem (unreadable, corrupt, too large) otherwise."""
    import cv2
    import numpy as np

    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise CorruptImageError(f"cannot read image file {path!r}: {exc.strerror}") from None
    image = None
    if data.size:
        # OpenCV's own log lines about a bad file would add to the one-line error below: silenced.
        previous = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        try:
            image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        except cv2.error:
            image = None
        finally:
            cv2.utils.logging.setLogLevel(previous)
    if image is None:
        raise CorruptImageError(decode_failure(path))
    return image


def default_cache_dir() -> Path:
    """``$MABN_CACHE`` if set, else ``~/.cache/mabn``."""
    env = os.environ.get("MABN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mabn"


def build_once(target: Path, write: Callable[[Path], None], description: str,
               log: Callable[[str], None] = print, marker: str = "meta.json") -> Path:
    """Return ``target``, written first by ``write(folder)`` if no process has yet.

    ``write`` must create ``folder`` and write ``marker`` into it last. Safe to call from every
    rank at once: one process writes into a temporary folder next to ``target`` and renames it
    into place under an exclusive ``fcntl`` lock (``<target>.lock``); the others wait on the lock
    and then find the finished folder. A ``target`` without the marker (left by something else,
    or by a writer that did not finish) is not trusted: it is removed and written again.
    """
    import fcntl

    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / (target.name + ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (target / marker).is_file():
                return target
            if target.exists():
                shutil.rmtree(target)
            log(f"writing {description} to {target}")
            temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                shutil.rmtree(temporary)  # a unique name that ``write`` creates itself
                write(temporary)
                if not (temporary / marker).is_file():
                    raise RuntimeError(f"the writer of {target} did not write {marker}")
                os.rename(temporary, target)
            finally:
                if temporary.exists():
                    shutil.rmtree(temporary, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target
