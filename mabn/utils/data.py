"""Data pieces every trainer shares: exact evaluation shards (:class:`ShardSampler`), image files
decoded by OpenCV with one-line errors (:func:`load_bgr`), and generated datasets written once
into the cache (:func:`default_cache_dir`, :func:`build_once`).

numpy, OpenCV and PIL are imported inside the functions that use them, so that ``import mabn``
needs torch alone.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Tuple

from torch.utils.data import Sampler

from mabn.utils.errors import CorruptImageError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ShardSampler", "build_once", "declared_size", "decode_failure", "default_cache_dir", "load_bgr",
           "opencv_max_pixels"]

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
