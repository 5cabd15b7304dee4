"""Files this project writes for users: atomically, and a full disk is one clear line."""

from __future__ import annotations

import os
from pathlib import Path

from mmsa.errors import DISK_FULL, DiskFullError


def write_predictions(path: Path, guids: list[str], tags: list[str]) -> None:
    """`guid,tag` then one line per guid."""
    write_atomically(path, ("guid,tag\n" + "".join(f"{g},{t}\n" for g, t in zip(guids, tags))).encode("utf-8"))


def write_atomically(path: Path, data: bytes) -> None:
    """Via a temporary file and a rename: a reader never sees half a file, and a failed write
    (a full disk: one-line DiskFullError) leaves what was at `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise DiskFullError(f"{path}: no space left on the device ({len(data) / 2**20:.1f} MiB to write); "
                            + ("the earlier file is unchanged" if path.exists() else "nothing was written")) from None
    finally:
        tmp.unlink(missing_ok=True)
