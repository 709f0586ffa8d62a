"""The instance store: each received instance as one file, written atomically, under the data folder.

Layout: instances/<Study Instance UID>/<Series Instance UID>/<SOP Instance UID>.dcm. UIDs are checked
before they become path parts, so nothing a sender puts in a UID can write outside the store.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class StoreError(OSError):
    pass


def is_uid(text: str) -> bool:
    return len(text) <= 64 and _UID.match(text) is not None


class InstanceStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_instance_uid):
            if not is_uid(uid):
                raise StoreError(f"not a DICOM UID: {uid[:80]!r}")
        return self.root / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    def free_bytes(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free

    def write(self, path: Path, data: bytes) -> tuple[int, int]:
        """`data` at `path`, complete or not at all: a temporary file beside it, flushed to disk, renamed.
        The file's (device, inode), which tell this write's file from a later one at the same path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=".part")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                written = os.fstat(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)
        return written.st_dev, written.st_ino

    def remove_stale_parts(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files a killed writer left behind; how many."""
        removed = 0
        if not self.root.is_dir():
            return removed
        limit = time.time() - older_than_s
        for part in self.root.rglob(".incoming-*.part"):
            with contextlib.suppress(FileNotFoundError):
                if part.is_file() and not part.is_symlink() and part.stat().st_mtime < limit:
                    part.unlink()
                    removed += 1
        return removed


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
