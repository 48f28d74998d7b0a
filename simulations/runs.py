"""What a run owns: its folder, the right to write it, and the processes it starts.

* Names the user chose (a run's ``name``, a key's, a site's) become one path
  component under a known folder, never a path that leaves it (:func:`child`).
* A folder fedfuse made carries a marker, ``.fedfuse-<kind>``; ``--force``
  replaces only a folder with the marker of its kind, and never one that holds
  data, the project or the home folder (:func:`check_replaceable`).
* One writer per run folder (:func:`hold`): an exclusive ``flock`` on
  ``<folder>/.fedfuse-lock``, which records the owner's pid and start. The
  kernel releases it when its holders die, so a dead owner's lock is taken over
  and a live one's is refused.
* No process outlives the command that started it. Direct children get a
  parent-death signal (:func:`die_with_parent`); the rest (the SuperExec, the
  simulation process, Ray and its workers are grandchildren) carry
  ``FEDFUSE_RUN=<folder>`` in their environment; a watchdog started by
  :func:`hold` records its parent's descendants while the parent lives and,
  once it is gone, kills those, their descendants and every process so
  marked. The watchdog shares the lock, so the folder stays locked until they
  are gone.

* Nothing is written through a symbolic link planted in a run folder: the lock
  and the logs are opened with ``O_NOFOLLOW`` and must be regular files
  (:func:`open_log`); whole files (the marker, configs) are written to a new
  temporary file and renamed over their name (:func:`write_safely`), which
  replaces a link rather than following it.

Besides the standard library this module imports only ``shared.config`` (for
the name rule; no torch, numpy or Flower), so the watchdog, which runs it as
``python -m simulations.runs FOLDER``, starts in a moment.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from shared.config import NAME_BYTES, ConfigError, check_plain_name

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCK = ".fedfuse-lock"
OWNER_ENV = "FEDFUSE_RUN"  # set in every Flower process a run starts: the run folder
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SWEEP_S = 20.0  # the watchdog's limit for stopping what is left
DONE = b"done"  # what hold() tells its watchdog before closing its stdin: the parent lives, the run ended
POLL_S = 0.5  # how often the watchdog looks at its parent and records the parent's descendants
JSON_BYTES = 4096  # a marker or a lock holds one line of JSON; more is not one


class FolderError(RuntimeError):
    """A folder may not be written or replaced; the message says which and why."""


def child(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` for a ``name`` the user chose (``what`` says where it came from, for the error).

    Refuses a name that is not one plain path component (``shared.config.check_plain_name``).
    """
    try:
        return Path(folder) / check_plain_name(name, f"{what} (a name inside {Path(folder)})", max_chars=NAME_BYTES)
    except ConfigError as err:
        raise FolderError(str(err)) from None


def marker(folder: Path, kind: str) -> Path:
    """The file that says fedfuse made ``folder`` as a ``kind`` (run, data, deploy, sweep)."""
    return Path(folder) / f".fedfuse-{kind}"


def mark(folder: Path, kind: str) -> None:
    """Record that fedfuse made ``folder`` as a ``kind``; only such a folder may be replaced later."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        made_by = version("fedfuse")
    except PackageNotFoundError:
        made_by = "unknown"
    Path(folder).mkdir(parents=True, exist_ok=True)
    made = json.dumps({"made_by": "fedfuse", "kind": kind, "version": made_by,
                       "created": datetime.now().isoformat(timespec="seconds")}) + "\n"
    write_safely(marker(folder, kind), lambda path: path.write_text(made))


def is_marked(folder: Path, kind: str) -> bool:
    """Whether ``folder`` holds a readable marker of ``kind``: a regular file, not a link to another folder's."""
    try:
        fd = os.open(marker(folder, kind), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            made = json.loads(file.read(JSON_BYTES)) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (OSError, ValueError):
        return False
    return isinstance(made, dict) and made.get("made_by") == "fedfuse" and made.get("kind") == kind


def check_replaceable(folder: Path, kind: str, flag: str, keep: dict[str, str | Path | None] | None = None) -> None:
    """Refuse to replace ``folder`` unless fedfuse made it as a ``kind`` and it holds nothing in ``keep``.

    ``keep``: what must survive, by name (``data.root``: its path); the
    project, the home folder and the working directory are always kept.
    Reads only: nothing is written or deleted.
    """
    folder = Path(folder).resolve()
    always = {"the fedfuse project": PROJECT_ROOT, "the home folder": Path.home(), "the working directory": Path.cwd()}
    for what, kept in {**(keep or {}), **always}.items():
        if kept is None or str(kept) == "":
            continue
        kept = Path(kept).resolve()
        if folder == kept or folder in kept.parents:
            raise FolderError(f"{flag} {folder}: refusing to replace it: it is or holds {what} ({kept}), which "
                              "must be kept; choose another folder")
    if not is_marked(folder, kind):
        raise FolderError(f"{flag} {folder}: refusing to replace it: fedfuse did not make it (no "
                          f"{marker(folder, kind).name} file); --force replaces only a folder fedfuse made, so choose "
                          "another folder or empty this one yourself")


def clear(folder: Path, keep: Callable[[Path], bool] = lambda entry: False) -> list[Path]:
    """Delete what ``folder`` holds except its lock (held by the caller, see :func:`hold`) and the folders
    ``keep`` picks, at any depth: a folder on the way to one is emptied, not removed. Links are removed, never
    followed. Returns the folders kept."""
    def holds_kept(entry: Path) -> bool:
        return any(keep(Path(top) / name) for top, names, _ in os.walk(entry) for name in names)

    def empty(where: Path, top: bool) -> list[Path]:
        kept = []
        for entry in where.iterdir():
            if top and entry.name == LOCK:
                continue
            if not entry.is_dir() or entry.is_symlink():
                entry.unlink()
            elif keep(entry):
                kept.append(entry)
            elif holds_kept(entry):
                kept += empty(entry, top=False)
            else:
                shutil.rmtree(entry)
        return kept

    return empty(Path(folder), top=True)


def write_safely(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` whole: ``write`` fills a new temporary file beside it, which is then renamed to ``path``.

    A symbolic link planted at ``path`` is replaced, never written through, and
    no reader sees half a file. Raises :class:`FolderError` if ``path`` cannot
    be replaced (a folder, say).
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # what a plain write gives under the usual umask; mkstemp's 0600 would hide run files
    os.close(fd)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except OSError as err:
        raise FolderError(f"{path}: cannot write it ({err.strerror}); expected a file fedfuse may replace") from None
    finally:
        Path(temporary).unlink(missing_ok=True)


def subfolder(path: Path) -> Path:
    """``path``, a folder fedfuse keeps in a run folder (Flower's home, Ray's), made if absent; refuses a link,
    since what is written there would land where it points."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FolderError(f"{path}: {'a symbolic link' if path.is_symlink() else 'not a folder'}; expected a folder "
                          "fedfuse makes in the run folder (it never writes through a link): remove it and retry")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _open_regular(path: Path, flags: int) -> int:
    """An fd of ``path`` opened with ``flags`` (created if absent), never through a link; refuses anything but a
    regular file (a FIFO or a device would block or be written to)."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        why = "a symbolic link" if err.errno == errno.ELOOP else f"cannot open it ({err.strerror})"
        raise FolderError(f"{path}: {why}; expected a regular file fedfuse writes (it never writes through a "
                          "link): remove it and retry") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FolderError(f"{path}: not a regular file; expected a regular file fedfuse writes: remove it and retry")
    os.set_blocking(fd, True)
    return fd


def open_log(path: Path, binary: bool = False):
    """``path`` opened to append (a log in a run folder), never through a link (:func:`_open_regular`)."""
    return os.fdopen(_open_regular(Path(path), os.O_WRONLY | os.O_APPEND), "ab" if binary else "a")


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies (Linux; else None).

    The signal follows the thread that started the child, so call
    ``subprocess`` from the thread that lives as long as the run (the main one).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def _lock(folder: Path) -> int:
    """An fd holding ``folder``'s exclusive lock, with this process recorded as its owner; refuses a live owner."""
    fd = _open_regular(folder / LOCK, os.O_RDWR)  # a link planted as the lock would be truncated below
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _owner(fd)
        os.close(fd)
        raise FolderError(f"{folder}: {owner}") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "started": _start_ticks(os.getpid()),
                             "since": datetime.now().isoformat(timespec="seconds")}).encode())
    return fd


def _owner(lock: int) -> str:
    """Who holds the lock open as fd ``lock``, for the refusal."""
    try:
        owner = json.loads(os.pread(lock, JSON_BYTES, 0))
        pid, since = int(owner["pid"]), owner["since"]
    except (OSError, ValueError, KeyError, TypeError):
        return "another fedfuse command is writing this folder; wait until it ends"
    if _start_ticks(pid) == owner.get("started"):
        return (f"another fedfuse run (pid {pid}, since {since}) is writing this folder; wait until it ends or "
                f"stop it (kill {pid}), then retry")
    return (f"the fedfuse run that wrote this folder (pid {pid}, since {since}) has ended and its processes are "
            "being stopped; retry in a few seconds")


def _stat(pid: int | str) -> tuple[str, int, int] | None:
    """``pid``'s state, parent's pid and start (clock ticks since boot; with the pid, it names one process and
    not a reuse of its pid), from ``/proc``; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _start_ticks(pid: int) -> int | None:
    stat = _stat(pid)
    return stat[2] if stat else None


@contextlib.contextmanager
def hold(folder: Path) -> Iterator[Path]:
    """Be ``folder``'s one writer while the block runs, and stop what is left of its processes after it.

    Creates ``folder`` if needed. Raises :class:`FolderError` while another
    live command holds it. A watchdog (:func:`watch`) shares the lock: if this
    process dies (SIGKILL, the OOM killer), it kills what this process started
    and every process whose environment has ``FEDFUSE_RUN`` at or under
    ``folder``, and only then is the folder free.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder)
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    try:
        dog = subprocess.Popen([sys.executable, "-m", "simulations.runs", str(folder)], stdin=subprocess.PIPE,
                               pass_fds=(fd,), cwd=PROJECT_ROOT, env=env, start_new_session=True)
        try:
            yield folder
        finally:
            dog.stdin.write(DONE)  # a normal end: the watchdog sweeps what is still marked (nothing, normally)
            dog.stdin.close()
            dog.wait()
    finally:
        os.close(fd)


def owned_by(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` was started for a run in ``folder`` (its ``FEDFUSE_RUN`` is at or under it).

    Only a backup for :func:`watch`'s record: a process that rewrites its
    title (Ray's agents) can overwrite the environment ``/proc`` shows.
    """
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    prefix = f"{OWNER_ENV}=".encode()
    for entry in env:
        if entry.startswith(prefix):
            where = Path(entry[len(prefix):].decode(errors="replace"))
            return where == folder or folder in where.parents
    return False


def processes() -> dict[int, tuple[int, int]]:
    """Every live process (not a zombie): pid -> (its parent's pid, when it started)."""
    stats = {int(p.name): _stat(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    return {pid: (stat[1], stat[2]) for pid, stat in stats.items() if stat and stat[0] != "Z"}


def _is_watchdog(pid: int) -> bool:
    try:
        return pid == os.getpid() or b"\0simulations.runs\0" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _family(table: dict[int, tuple[int, int]], seeds: dict[int, int], roots: frozenset[int] = frozenset(),
            folder: Path | None = None) -> dict[int, int]:
    """``seeds`` still alive (pid -> start), the processes marked with ``folder``, and every descendant of
    them and of ``roots``; never a watchdog. Returns pid -> start, so a reused pid is not taken for its namesake."""
    family = {p: s for p, s in seeds.items() if p in table and table[p][1] == s}
    if folder is not None:
        family.update({p: table[p][1] for p in table if owned_by(p, folder)})
    grew = True
    while grew:
        grew = False
        for pid, (ppid, start) in table.items():
            if pid not in family and (ppid in family or ppid in roots):
                family[pid] = start
                grew = True
    return {p: s for p, s in family.items() if not _is_watchdog(p)}


def sweep(folder: Path, seen: dict[int, int] | None = None, limit_s: float = SWEEP_S) -> list[int]:
    """Kill the processes of a run in ``folder``: those marked with it, ``seen`` (pid -> start), and their descendants.

    Each is stopped (SIGSTOP) as it is found, so none can start a child that
    escapes, and all are killed (SIGKILL) once a scan finds no more. Returns
    the pids killed.
    """
    family: dict[int, int] = {}
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = _family(processes(), {**(seen or {}), **family}, folder=folder)
        new = [p for p in found if p not in family]
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        family.update(found)
    for pid in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return sorted(family)


def watch(folder: Path) -> None:
    """The watchdog: record the parent's descendants until it closes stdin or dies, then :func:`sweep` ``folder``.

    After a normal end (stdin closed) only what is still marked with the
    folder is swept: the parent's other processes are none of this run's
    business. After the parent's death, everything it started is.
    """
    parent = os.getppid()
    seen: dict[int, int] = {}
    said = b""
    while os.getppid() == parent:
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        got = os.read(sys.stdin.fileno(), 64) if ready else None
        if got == b"":  # stdin closed: by hold() after saying DONE, or by the kernel as the parent died
            break
        said += got or b""
        seen = _family(processes(), seen, roots=frozenset({parent}))
    sweep(folder, None if said == DONE else seen)


if __name__ == "__main__":
    watch(Path(sys.argv[1]))
