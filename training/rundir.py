"""A run directory (train.py's --out) replaced whole at each save: a kill never leaves half a checkpoint.

A save writes the complete next generation (weights, config, tokenizer, training state) into a staging
folder beside the run directory, `.<name>.next`, then swaps the two in one atomic rename (Linux
renameat2 with RENAME_EXCHANGE) and deletes the previous generation. Readers (export/, scripts/demo.sh)
find `<out>/model.safetensors`, `<out>/config.json`, ... as always, from the old generation or the new.
Where the exchange is unavailable (another OS, a file system without it) the run directory is renamed
aside to `.<name>.old` first; `recover`, which every run calls before reading --out, finishes a save
that a kill cut between those two renames.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def save_hook(point: str) -> None:
    """Called at each point of a save; does nothing. Tests replace it to kill the process there.

    "weights"   (train.py) the weights are staged, the training state not yet
    "staged"    the next generation is complete beside the run directory, nothing swapped
    "aside"     (without an exchange only) the old generation renamed aside, the new one not yet in place
    "published" the new generation is the run directory; the old one is not yet deleted
    """


def _siblings(out: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(os.path.realpath(out))  # a symlinked run directory: swap its target, keep the link
    return out.with_name(f".{out.name}.next"), out.with_name(f".{out.name}.old")


def stage(out: str | os.PathLike) -> Path:
    """An empty folder beside `out` to write the next generation into."""
    path = _siblings(out)[0]
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def publish(staged: Path, out: str | os.PathLike) -> None:
    """Make the staged generation the run directory, atomically.

    What `out` holds and the stage lacks (the step log, anything else put there) is carried over as
    hard links (copies where links fail).
    """
    out = Path(os.path.realpath(out))
    if out.is_dir():
        for entry in out.iterdir():
            target = staged / entry.name
            if os.path.lexists(target):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, target, symlinks=True, copy_function=_link)
            else:
                _link(entry, target)
    save_hook("staged")
    if out.exists() and _exchange(staged, out):
        save_hook("published")
        shutil.rmtree(staged)  # the previous generation now
        return
    aside = _siblings(out)[1]
    if out.exists():
        os.rename(out, aside)
    save_hook("aside")
    os.rename(staged, out)
    save_hook("published")
    shutil.rmtree(aside, ignore_errors=True)


def recover(out: str | os.PathLike) -> None:
    """Finish or undo a save that a kill interrupted; afterwards `out` holds one complete generation."""
    staged, aside = _siblings(out)
    if aside.exists():
        if not os.path.lexists(os.path.realpath(out)):
            # Killed between the two renames: the stage was complete before the old generation moved aside.
            os.rename(staged if staged.exists() else aside, os.path.realpath(out))
        shutil.rmtree(aside, ignore_errors=True)
    # An unfinished stage, or the previous generation after an exchange: nothing anyone reads.
    shutil.rmtree(staged, ignore_errors=True)


def _link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the system or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux, or a libc without it
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
