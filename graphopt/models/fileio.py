"""Atomic writes, in one place: readers see the old file (or directory) or the whole new one, never half.

    write_file_atomically(path, data)                 one file: temp file beside it, fsync, rename
    replace_dir_atomically(target, write, is_ours)    a directory: temp dir beside it, fsync, swap

Both give what they create the mode the user's umask asks for (mkstemp and mkdtemp create 0600 /
0700, which silently made shipped files private). The temporary sits in the target's folder, so
the rename stays on one file system and is atomic; on any error it is removed and the target is
left as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["replace_dir_atomically", "umask_mode", "write_file_atomically"]


def umask_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give a new file (0o666) or directory (0o777) under the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def write_file_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically, with the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir_atomically(target: str | os.PathLike, write: Callable[[Path], None],
                           is_ours: Callable[[Path], bool], what: str = "directory",
                           carry_over: Callable[[Path, Path], None] | None = None) -> None:
    """Call `write(tmp)` on a fresh temporary sibling of `target`, then swap it in as `target`.

    An existing `target` is replaced only when it is empty or `is_ours(target)` (e.g. it holds our
    manifest); anything else is a FileExistsError, so a typo cannot delete someone's folder.
    `carry_over(old, new)`, if given, copies what of the old directory the new one should keep.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"cannot write a {what} to {target}: it is a file")
    if target.is_dir() and any(target.iterdir()) and not is_ours(target):
        raise FileExistsError(f"refusing to replace {target}: it is a non-empty directory that is not a {what}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = tmp.with_name(f".{target.name}.old-{tmp.name.rsplit('.tmp-', 1)[1]}")
    try:
        write(tmp)
        # writers may go through mkstemp themselves (safetensors does): every mode from the umask
        for item in [tmp, *tmp.rglob("*")]:
            os.chmod(item, umask_mode(directory=item.is_dir()))
        if carry_over is not None and target.is_dir():
            carry_over(target, tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if target.is_dir():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
