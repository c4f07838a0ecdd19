"""Checkpoint uploads that fail do not end the run, and a checkpoint is reported only when it is all there.

Every worker uploads its own ZeRO shard (rank 0 also the history and pca axes) into one folder of the run's
storage, file by file, and checks each is there at its size (io.copy_dir): Ray Train's own upload goes
through pyarrow's copy_files, which into an s3fs store reports success when every write was refused (seen
with S3 answering 503: Ray registered a checkpoint with no files). A store can refuse writes for a while
(S3 throttling, a network blip): each worker retries its upload with exponential backoff; then the
workers agree whether every shard arrived. If one did not, the
checkpoint is not reported to Ray Train (a resume would find it incomplete): rank 0 removes what arrived,
every worker reports the step's metrics without it and training goes on, the next checkpoint due in
`checkpoint_every` steps. Failures are counted (`checkpoint_failures` in the run's metrics).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rayembed.io import copy_dir

log = logging.getLogger("rayembed.train")

ATTEMPTS, BACKOFF_S = 4, 1.0  # waits of 1, 2, 4 s between the attempts


def checkpoint_name(step: int) -> str:
    """The checkpoint folder of a step (zero-padded: names sort in step order)."""
    return f"checkpoint_step{step:09d}"


def upload(local_dir: str, name: str, attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S) -> Any:
    """This worker's files into the run's `name` folder (Ray Train's storage), retried with exponential
    backoff: the persisted ray.train.Checkpoint, or None if every attempt failed."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    path = storage.build_checkpoint_path_from_name(name)
    for attempt in range(attempts):
        try:  # file by file and checked: Ray's own upload (pyarrow's copy_files) can lose them silently
            copy_dir(local_dir, storage.storage_filesystem, path)
            return ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)
        except Exception as e:  # the store's error, whatever its type (pyarrow, s3fs, OSError)
            wait = backoff_s * 2**attempt
            last = attempt == attempts - 1
            log.warning(f"checkpoint {name}: upload attempt {attempt + 1}/{attempts} failed: {e}"
                        + ("" if last else f"; retrying in {wait:g} s"))  # fmt: skip
            if not last:
                time.sleep(wait)
    return None


def discard(name: str) -> None:
    """Remove what arrived of an incomplete checkpoint (best effort: it is not reported either way)."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    try:
        storage.storage_filesystem.delete_dir(storage.build_checkpoint_path_from_name(name))
    except Exception as e:
        log.warning(f"checkpoint {name}: incomplete, not reported; its files could not be removed: {e}")
