"""Output files that never clobber: one check before the work, one lock during it, one atomic write after.

Every command that writes a file (the CLI's `--out` and `--json`, the app's
Export) goes through `plan_output` before it loads a model or reads a corpus:

- the destination must be a file name (not a folder), in a folder that exists
  or can be created, and that this process can write to;
- an existing file is refused unless the caller passes `overwrite=True`;
- a destination that is one of the command's inputs (same path, a symlink to
  it, or a hard link: same device and inode) is always refused, overwrite or
  not: writing it would destroy what the command reads;
- an advisory lock (`fcntl.flock` on a lock file in the user's state folder,
  keyed by the destination's real path) is taken at once and held until the
  atomic rename, so a second command writing the same file at the same time is
  refused with a message and the first completes.

`OutputTarget.write_bytes` then writes through a temporary file in the same
folder and renames it into place: a reader never sees half a file, and a
failure leaves any existing file byte-identical. Without `overwrite` the final
step is `os.link` (create-if-absent, atomic), so a file that appeared in the
meantime by other means is still never replaced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from chunktui.shared.errors import ChunkError


class OutputError(ChunkError):
    """An output destination cannot be used (exists, is an input, is a folder, unwritable, busy)."""


def _describe(option: str | None, path: Path) -> str:
    return f"{option} {path}" if option else str(path)


def _same_file(a: Path, b: Path) -> bool:
    """True when a and b name one file: same real path, or (both existing) same device and inode."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
    except (OSError, ValueError):
        pass
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _probe_writable(folder: Path) -> str | None:
    """None if a file can be created in `folder` (tried for real: root ignores permission bits), else why not."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".chunktui-probe-", suffix=".tmp")
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return None


def _lock_dir() -> Path:
    from chunktui.paths import state_dir

    for folder in (state_dir() / "locks", Path(tempfile.gettempdir()) / f"chunktui-locks-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OutputError("Could not create a lock file (neither the state folder nor the temp folder is writable).")


def _acquire_lock(path: Path, option: str | None) -> tuple[int, Path] | None:
    """An exclusive advisory lock on `path`'s real path, or OutputError if another writer holds it.

    The lock file is removed on release (while still locked); a writer that
    locked a file just removed retries on the new one, so two writers never
    both hold "the" lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, the existence check still holds
        return None
    key = hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    lock_path = _lock_dir() / f"{key}.lock"
    for _ in range(20):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputError(f"{_describe(option, path)}: another chunktui command is writing this file right "
                                  "now. Wait for it to finish, or choose another file name.") from None
            raise OutputError(f"Could not lock {path}: {err.strerror or err}.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {os.path.realpath(path)}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                pass
            return fd, lock_path
        os.close(fd)  # the holder removed it as we opened it: lock the new one
    raise OutputError(f"Could not lock {path}: the lock file keeps changing.")


@dataclass
class OutputTarget:
    """A checked, locked destination. Write once with `write_bytes` / `write_text` / `write_json`, or `release`."""

    path: Path
    overwrite: bool = False
    option: str | None = None
    existed: bool = False
    _lock: tuple[int, Path] | None = field(default=None, repr=False)
    real: Path | None = None  # a symlinked destination is written through: the file it points at is replaced

    def __enter__(self) -> "OutputTarget":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a forgotten target must not keep the lock for the life of the process
        self.release()

    def release(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            fd, lock_path = lock
            try:
                os.unlink(lock_path)  # still locked: nobody can hold it meanwhile
            except OSError:
                pass
            try:
                os.close(fd)  # closing the descriptor drops the flock
            except OSError:
                pass

    def write_bytes(self, data: bytes) -> Path:
        """Atomic write (temp file, fsync, rename); releases the lock. Refuses a file that appeared meanwhile."""
        from chunktui.shared.io import write_temp_beside

        path = self.real or self.path
        tmp = None
        try:
            if path.is_dir():
                raise OutputError(f"{_describe(self.option, path)} is a folder; give a file name.")
            tmp = write_temp_beside(path, data)
            if self.overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails if the name exists: never replaces a file by accident
                except FileExistsError:
                    raise OutputError(f"{_describe(self.option, path)} appeared while this command ran; nothing "
                                      "was written over it. Pass --overwrite to replace it, or choose another "
                                      "file name.") from None
                except OSError as err:
                    if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                        raise
                    if path.exists():  # a file system without hard links: check, then rename
                        raise OutputError(f"{_describe(self.option, path)} appeared while this command ran; "
                                          "nothing was written over it.") from None
                    os.replace(tmp, path)
        except OutputError:
            raise
        except OSError as err:
            raise OutputError(f"Could not write {path}: {err.strerror or err}. Nothing was written; choose "
                              "another path.") from err
        finally:
            if tmp is not None and os.path.lexists(tmp):
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            self.release()
        return path

    def write_text(self, text: str) -> Path:
        return self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj) -> Path:
        from chunktui.shared.io import _default

        try:
            text = json.dumps(_finite(obj), indent=2, allow_nan=False, default=_default)
        except (TypeError, ValueError) as err:
            self.release()
            raise OutputError(f"Could not write {self.path}: {err}.") from None
        return self.write_text(text + "\n")


def _finite(obj):
    """JSON has no NaN or infinity: write them as null (the standard's reading of a missing number)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


_SYSTEM = ("/dev/", "/proc/", "/sys/")


def _special_path(target: Path) -> str | None:
    """Why `target` (or what its symlinks lead to) is no place for an atomic write, or None.

    /dev/stdout, /dev/null, /proc/self/fd/1, a FIFO, a terminal: renaming a file onto the name would replace
    the link itself (as root: the system's /dev/stdout), and writing through it is not atomic.
    """
    import stat

    given = os.path.abspath(target)
    hops = [given]  # every link on the way, resolved one at a time (realpath would follow /proc's magic links)
    current = given
    for _ in range(40):
        parent = os.path.realpath(os.path.dirname(current))
        current = os.path.join(parent, os.path.basename(current))
        if not os.path.islink(current):
            hops.append(current)
            break
        current = os.path.join(parent, os.readlink(current))
        hops.append(os.path.normpath(current))
    for p in hops:
        if p.startswith(_SYSTEM) or p in ("/dev", "/proc", "/sys"):
            return f"is a system path ({p})" if p == given else f"leads to a system path ({p})"
    try:
        st = os.stat(target)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        return "is not a regular file (a device, FIFO or socket)"
    return None


def remove_stale_temps(path: Path) -> int:
    """Remove `.NAME.*.tmp` files beside `path` (what `write_temp_beside` makes); returns how many.

    Only called while holding the destination's lock, so no live writer owns them.
    """
    removed = 0
    try:
        for tmp in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
            try:
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink()
                    removed += 1
            except OSError:
                pass
    except OSError:
        pass
    return removed


def plan_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False,
                option: str | None = None, suffix: str | None = None, lock: bool = True) -> OutputTarget:
    """Check an output destination before any work, and lock it; see the module docstring.

    `inputs` are every file the command reads (None entries are ignored).
    `option` names the destination in messages (e.g. "--out"). `suffix`, if
    given, is the ending the file name must have.
    """
    if path is None or not str(path).strip():
        raise OutputError(f"{option or 'The output'}: give a file name.")
    raw = str(path)
    target = Path(raw).expanduser()
    where = _describe(option, target)
    if raw.endswith(("/", os.sep)) or target.is_dir():
        raise OutputError(f"{where} is a folder; give a file name inside it.")
    if target.name in ("", ".", ".."):
        raise OutputError(f"{where}: give a file name.")
    for item in inputs:
        if item is None or not str(item):
            continue
        if _same_file(target, Path(str(item)).expanduser()):
            raise OutputError(f"{where} is also an input of this command ({item}); writing it would destroy what "
                              "the command reads. Choose another file name (--overwrite does not apply here).")
    if suffix and not target.name.endswith(suffix):
        raise OutputError(f"{where}: the file name must end in {suffix}.")
    if os.path.lexists(target) and not target.exists():
        raise OutputError(f"{where} is a broken symbolic link (or a symlink loop); remove it or choose another "
                          "file name.")
    special = _special_path(target)
    if special:
        raise OutputError(f"{where} {special}; chunktui writes whole files atomically (a temporary file renamed "
                          "into place) and will not write through it. Give a regular file name.")
    if target.exists() and not target.is_file():
        raise OutputError(f"{where} exists and is not a regular file; choose another file name.")
    parent = target.parent
    existing = _nearest_existing(parent)
    if not existing.is_dir():
        raise OutputError(f"Could not write {where}: {existing} is a file, not a folder. Choose another path.")
    why = _probe_writable(existing)
    if why:
        raise OutputError(f"Could not write {where}: cannot create files in {existing} ({why}). "
                          "Choose another folder.")
    held = _acquire_lock(target, option) if lock else None
    real = Path(os.path.realpath(target)) if os.path.islink(target) else None
    result = OutputTarget(path=target, overwrite=overwrite, option=option, _lock=held, real=real)
    if held is not None:
        remove_stale_temps(real or target)  # left by a writer killed mid-write (we hold the lock: none is live)
    # checked under the lock, so two chunktui commands cannot both pass it
    if target.exists():
        if not overwrite:
            result.release()
            raise OutputError(f"{where} already exists. Pass --overwrite to replace it, or choose another file name.")
        result.existed = True
    return result


def plan_outputs(outputs: Iterable[tuple[str | None, str | os.PathLike | None, str | None]],
                 inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False) -> list[OutputTarget | None]:
    """Plan several outputs of one command: (option, path or None, suffix) each; they must differ from each other.

    Returns one target per entry (None where the path is None). On any refusal
    the locks already taken are released.
    """
    outputs = list(outputs)
    inputs = list(inputs)
    given = [(opt, Path(str(p)).expanduser()) for opt, p, _ in outputs if p is not None and str(p).strip()]
    for i, (opt_a, a) in enumerate(given):
        for opt_b, b in given[:i]:
            if _same_file(a, b):
                raise OutputError(f"{_describe(opt_a, a)} and {_describe(opt_b, b)} are the same file; give each "
                                  "output its own name.")
    planned: list[OutputTarget | None] = []
    try:
        for opt, p, suffix in outputs:
            planned.append(None if p is None else plan_output(p, inputs, overwrite, option=opt, suffix=suffix))
    except BaseException:
        for t in planned:
            if t is not None:
                t.release()
        raise
    return planned
