"""Output that is never half written and never overwrites what it should not.

Shared by `qlora quantize` and `qlora finetune`: an output is built in a partial folder beside
it, named after the writing process (pid and start time), and renamed into place when complete.
The rename refuses an existing output unless asked to replace it (atomically: no window between
the check and the rename); a replaced output is deleted only once the new one is in place.
SIGTERM and SIGHUP unwind like Ctrl-C, so the partial folder is removed; one left by a process
that died anyway (SIGKILL, power loss) is removed by the next run, never one that a live process
is still writing. Older versions named the folder without its writer (`.DST.xxxxxxxx.partial`): such a
folder is removed once nothing in it changed for a day, if this user owns all of it.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from qlora.errors import UserError

PARTIAL_SUFFIX = ".partial"
# After ".{dst name}.": the writer's host, pid and start time (0 where unknown), mkdtemp's random part.
# The host: on a shared file system, a pid says nothing about another machine's processes.
_PARTIAL_NAME = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[A-Za-z0-9_]+" + re.escape(PARTIAL_SUFFIX))
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# The naming before the writer was recorded: mkdtemp's 8 random characters alone. Such a folder is
# removed only when this user owns it and everything in it, and nothing in it changed for a day.
_OLD_PARTIAL_NAME = re.compile(r"[a-z0-9_]{8}" + re.escape(PARTIAL_SUFFIX))
OLD_PARTIAL_STALE_SECONDS = 24 * 3600
_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCL = 0x4  # macOS sys/stdio.h
_partials_of_call: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("qlora_partials", default=None)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that it unwinds (and cleans up) like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# ---- who is writing ------------------------------------------------------------------------------

def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: count fields after the last ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _is_running(pid: int, start: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it: never guess, keep the folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        pass
    now = _process_start(pid)
    return start == 0 or now is None or now == start


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_partial_dir(dst: Path) -> Path:
    """A new empty folder beside dst, named after this process, readable as dst itself will be."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{HOST_TAG}-{os.getpid()}-{_process_start(os.getpid()) or 0}-"
    path = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{tag}", suffix=PARTIAL_SUFFIX, dir=dst.parent))
    os.chmod(path, 0o777 & ~_current_umask())  # mkdtemp makes it private; dst should not be
    registered = _partials_of_call.get()
    if registered is not None:
        registered.append(path)
    return path


def _raise(error: OSError):
    raise error


def _old_partial_abandoned(folder: Path) -> bool:
    """An old-style partial folder names no writer: it is taken for an abandoned one of ours only if this
    user owns it and all it holds (never following links), and nothing in it changed for a day."""
    if os.name == "nt":  # no owner to compare: never guess, keep it
        return False
    newest = 0.0
    try:
        for root, dirs, files in os.walk(folder, onerror=_raise):
            for path in [root, *(os.path.join(root, name) for name in dirs + files)]:
                info = os.lstat(path)
                if info.st_uid != os.getuid():
                    return False
                newest = max(newest, info.st_mtime, info.st_ctime)
    except OSError:  # unreadable or changing under us: keep it
        return False
    return time.time() - newest > OLD_PARTIAL_STALE_SECONDS


def remove_stale_partials(dst: Path) -> list[Path]:
    """Remove the partial folders of dst whose writer (on this host) is no longer running, and old-style
    ones (no writer recorded) abandoned for a day, saying so on stderr."""
    parent, prefix = dst.parent, f".{dst.name}."
    if not parent.is_dir():
        return []
    removed = []
    for entry in sorted(parent.iterdir()):
        if not entry.name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        rest = entry.name[len(prefix):]
        match = _PARTIAL_NAME.fullmatch(rest)
        if match is not None:
            pid, start = int(match["pid"]), int(match["start"])
            if match["host"] != HOST_TAG or _is_running(pid, start):
                continue
            why = f"left by process {pid}, which is no longer running"
        elif _OLD_PARTIAL_NAME.fullmatch(rest) and _old_partial_abandoned(entry):
            why = f"of an earlier qlora, untouched for over {OLD_PARTIAL_STALE_SECONDS // 3600} hours"
        else:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        print(f"qlora: removed {entry}, a partial output {why}", file=sys.stderr)
        removed.append(entry)
    return removed


def removes_partials_on_error(function):
    """Decorator: the partial folders made during the call are removed if it ends by an exception
    (Ctrl-C, SIGTERM and SIGHUP included); a completed call has renamed them into place."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        token = _partials_of_call.set([])
        try:
            return function(*args, **kwargs)
        except BaseException:
            for path in _partials_of_call.get():
                shutil.rmtree(path, ignore_errors=True)
            raise
        finally:
            _partials_of_call.reset(token)
    return wrapper


# ---- where it goes -------------------------------------------------------------------------------

def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_apart(out: Path, inputs: dict[str, Path], option: str = "--out") -> None:
    """Refuse an output that is, contains, or lies inside one of the inputs (by their real paths)."""
    out_real = out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out}: is a file, not a directory")
    for what, path in inputs.items():
        real = path.resolve()
        if _within(real, out_real) or _within(out_real, real):
            relation = "is" if real == out_real else "contains" if _within(real, out_real) else "lies inside"
            raise UserError(f"{option} {out}: {relation} the {what} {path}; choose an output apart from the inputs")


def inside_directory(directory: Path, relative: object, where: str) -> Path:
    """directory / relative for a path read from a file (where), refusing anything that could leave
    the directory (ValueError): absolute paths, drive letters, '..' parts, or not a string. Symbolic links
    are followed as the user placed them (the Hugging Face cache links shards into its blobs)."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{where}: expected a file name, got {relative!r}")
    parts = re.split(r"[\\/]", relative)
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or ":" in parts[0] or ".." in parts:
        raise ValueError(f"{where}: {relative!r} points outside {directory}; only names inside it are read")
    return directory / relative


# ---- putting it in place -------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _rename_syscall():
    """(name, function) of the C library's no-replace rename, or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd = -100
        return lambda a, b: libc.renameat2(at_fdcwd, a, at_fdcwd, b, _RENAME_NOREPLACE)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        return lambda a, b: libc.renamex_np(a, b, _RENAME_EXCL)
    return None


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename src to dst, failing with FileExistsError if dst exists, as one atomic step."""
    exists = FileExistsError(errno.EEXIST, f"{dst}: already exists (another run wrote it meanwhile?); "
                                           "pass --force to replace it")
    if os.name == "nt":  # Windows' rename never replaces
        try:
            os.rename(src, dst)
        except FileExistsError:
            raise exists from None
        return
    syscall = _rename_syscall()
    if syscall is not None:
        if syscall(os.fsencode(src), os.fsencode(dst)) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST or code == errno.ENOTEMPTY:
            raise exists
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # e.g. a file system without the flag
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    # Fallback: reserve dst with mkdir (atomic), then replace that empty folder of ours.
    if not src.is_dir() or src.is_symlink():  # a file or link: a hard link is the atomic no-replace step
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            raise exists from None
        os.unlink(src)
        return
    try:
        os.mkdir(dst)
    except FileExistsError:
        raise exists from None
    try:
        os.replace(src, dst)
    except OSError:
        os.rmdir(dst)  # our reservation, still empty
        raise


def replace_dir(work_dir: Path, dst: Path, force: bool) -> None:
    """Move the finished work_dir to dst. Without force an existing dst is an error, checked at the
    rename itself; with force the old dst is moved aside and deleted only once the new one is in place."""
    aside = None
    if force and (dst.exists() or dst.is_symlink()):
        aside = dst.with_name(f".{dst.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
        rename_no_replace(dst, aside)
    try:
        rename_no_replace(work_dir, dst)
    except BaseException as err:
        if aside is not None:
            try:
                rename_no_replace(aside, dst)
            except OSError:  # dst appeared meanwhile: say where the old output is, never lose it
                raise OSError(f"{dst}: the new output was not moved in ({err}); the old output is kept "
                              f"at {aside}") from err
        raise
    if aside is not None:
        with signals_held_back():  # the new output is complete: finish deleting the old one
            if aside.is_dir() and not aside.is_symlink():
                shutil.rmtree(aside)
            else:
                aside.unlink()


# ---- signals -------------------------------------------------------------------------------------

def _termination_signals() -> list[int]:
    return [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


@contextlib.contextmanager
def terminate_like_interrupt():
    """SIGTERM and SIGHUP raise Terminated (a KeyboardInterrupt) during the block, in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    previous = {signum: signal.signal(signum, raise_terminated) for signum in _termination_signals()}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_held_back():
    """Delay Ctrl-C, SIGTERM and SIGHUP until the block ends, so a checkpoint is never half moved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    signums = [signal.SIGINT, *_termination_signals()]
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum)) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            raise KeyboardInterrupt if caught[0] == signal.SIGINT else Terminated(caught[0])
