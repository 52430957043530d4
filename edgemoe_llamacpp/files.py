"""Files edgemoe writes: never an input, never an existing file without --force, always atomically.

Every output goes to an unpredictably named temporary beside it (`tempfile`), is fsynced and renamed over
the destination, and the directory is fsynced: a killed command leaves the old file or the new one, never a
torn one, and never touches what it read.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgemoe_llamacpp.errors import EdgeMoEError

TMP_SUFFIX = ".tmp"
# what a path may name besides a regular file, a directory or nothing: never written over, even with --force
_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"))


def _same_file(a: Path, b: Path) -> bool:
    """Is `a` the file `b` (same inode, or, where either cannot be stat'ed, the same resolved path)?"""
    try:
        return os.path.samefile(a, b)
    except OSError:                         # missing, a symlink loop, no permission
        return os.path.realpath(a) == os.path.realpath(b)


def special_kind(path: Path) -> str | None:
    """What `path` names if that is a FIFO, a device or a socket (through symlinks: "a symlink to a FIFO");
    None for a regular file, a directory, or nothing (missing, a dangling symlink or a loop)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    kind = next((name for test, name in _SPECIAL if test(mode)), None)
    return f"a symlink to {kind}" if kind and path.is_symlink() else kind


def check_output(out: str | os.PathLike, *, inputs=(), force: bool = False, what: str = "output") -> Path:
    """`out` as a Path if edgemoe may write it: not one of `inputs` (by inode or resolved path), not a
    directory, never a FIFO, device or socket (replacing one would turn it into a regular file, and writing
    to one would block or vanish), not an existing file unless `force`, in a directory that exists and is
    writable. Every output of the package and of tools/ passes here before any work starts."""
    out = Path(out)
    if not str(out) or str(out).endswith(os.sep):
        raise EdgeMoEError(f"{what} {str(out)!r} is not a file name")
    for src in inputs:
        if src is not None and str(src) and _same_file(out, Path(src)):
            raise EdgeMoEError(f"{what} {out} is also an input ({src}); edgemoe never modifies its input")
    if out.is_dir():
        raise EdgeMoEError(f"{what} {out} is a directory")
    kind = special_kind(out)
    if kind:
        raise EdgeMoEError(f"{what} {out} is {kind}, not a regular file; edgemoe writes regular files only "
                           f"and never replaces this, even with --force")
    if (out.exists() or out.is_symlink()) and not force:
        raise EdgeMoEError(f"{what} {out} exists; pass --force to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise EdgeMoEError(f"{what} {out}: no such directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgeMoEError(f"{what} {out}: directory {parent} is not writable")
    return out


def tool_output(out: str | os.PathLike, what: str = "--out", *, inputs=(), force: bool = True) -> Path:
    """An output of a script in tools/, checked before its work: as check_output, by default with force (the
    scripts rewrite their results file on every run), its directory made first. A refusal ends the script
    with one line and exit 2, as argparse ends on a bad argument."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return check_output(out, inputs=inputs, force=force, what=what)
    except (EdgeMoEError, OSError) as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The bytes of a regular file the user named; a FIFO, device or directory is refused (reading one could
    block for ever), as is anything unreadable, with one line."""
    path = Path(path)
    try:
        if not path.is_file():
            raise EdgeMoEError(f"{path}: not a regular {what}" if path.exists() else f"{path}: no such {what}")
        return path.read_bytes()
    except OSError as e:
        raise EdgeMoEError(f"{path}: cannot read the {what} ({e.strerror or e})") from None


def temporary_beside(dst: Path) -> Path:
    """A new, empty, unpredictably named file in dst's directory; its name starts with `.NAME.PID.` so
    that a later run can remove it if this process is killed (`clear_dead_temporaries`)."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=dst.parent)
    except OSError as e:
        raise EdgeMoEError(f"cannot write {dst}: {e.strerror or e}") from None
    os.close(fd)
    return Path(name)


def _umask() -> int:
    """This process's umask, read without changing it (/proc), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _seal(tmp: Path) -> None:
    """fsync `tmp` and give it the mode a newly created file gets (mkstemp made it 0600)."""
    with open(tmp, "rb+") as fh:
        os.fchmod(fh.fileno(), 0o666 & ~_umask())
        os.fsync(fh.fileno())


def _rename(tmp: Path, dst: Path) -> None:
    """Rename `tmp` over `dst` and fsync the directory."""
    os.replace(tmp, dst)
    with contextlib.suppress(OSError):
        dfd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def commit(tmp: Path, dst: Path) -> None:
    """fsync `tmp`, give it the mode a newly created file gets, rename it over `dst`, fsync the directory."""
    _seal(tmp)
    _rename(tmp, dst)


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[Path]:
    """Write to the yielded temporary path; on success it replaces `dst`, on any failure it is removed."""
    with atomic_outputs([dst]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_outputs(dsts: list[Path]) -> Iterator[list[Path]]:
    """atomic_output for a set of files (a split model's shards): write to the yielded temporaries; on success every
    one is fsynced before any is renamed, the first last. On a failure or an interrupt the temporaries, and the
    outputs already renamed, are removed: no partial set is left. A kill between two renames (microseconds) is
    the one window; convert stamps every shard with one id (edgemoe.set_id), so a set left mixed that way is
    refused when read."""
    dsts = [Path(d) for d in dsts]
    tmps: list[Path] = []
    done: list[Path] = []
    try:
        for dst in dsts:
            clear_dead_temporaries(dst)
            tmps.append(temporary_beside(dst))
        yield tmps
        for tmp in tmps:
            _seal(tmp)
        for tmp, dst in reversed(list(zip(tmps, dsts, strict=True))):
            _rename(tmp, dst)
            done.append(dst)
    except BaseException as e:
        for path in (*tmps, *done):
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(e, OSError):
            raise EdgeMoEError(f"cannot write {dsts[0]}: {e.strerror or e}") from None
        raise


def write_text(dst: str | os.PathLike, text: str) -> None:
    """Replace `dst` with `text` atomically (check_output first)."""
    with atomic_output(Path(dst)) as tmp:
        tmp.write_text(text)


def clear_dead_temporaries(dst: Path) -> None:
    """Remove the temporaries of earlier writes of `dst` whose process is gone (killed mid-write)."""
    prefix = f".{dst.name}."
    for tmp in dst.parent.glob(f".{glob.escape(dst.name)}.*{TMP_SUFFIX}"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except PermissionError:
            pass                        # alive, another user's


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    return sha256_files([path], chunk)


def sha256_files(paths, chunk: int = 8 << 20) -> str:
    """The sha256 of the files' bytes one after the other (a split model's shards, in order)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def _raise_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def clean_up_on_sigterm() -> None:
    """For scripts that write outputs: SIGTERM raises KeyboardInterrupt in the main thread from here on, so an
    output's temporary is removed as on Ctrl-C (Python's default ends the process where it stands, and the
    temporary, as large as the file, stays until the next write to that name). `edgemoe` itself routes SIGTERM
    through its Ctrl-C handling (cli.entry)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
