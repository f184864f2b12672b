"""Writing without losing results: files and folders appear only when complete, and an old
version is replaced only once the new one is in place.

A folder is replaced in three steps: the new content is written into a hidden temporary
folder ``.NAME.tmp-HOST-PID-XXXX`` beside it, the old folder is renamed aside to
``.NAME.old-HOST-PID-XXXX``, the new one is renamed in, and only then is the aside copy
deleted. A process killed at any point leaves either the old or the new folder under the
real name, or (between the two renames) the old one aside; :func:`recover_folder` (run
before every replace and every load) renames such an orphan back and deletes the debris of
dead writers. The owner of a hidden folder is read from its name, so the debris of a writer
that is still running (on this host) is never touched.

Created folders and files get the modes the umask allows (``mkdtemp`` and safetensors
would make them private to their owner, so a colleague could not load a shared model).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and everything under it) the modes a plain ``mkdir``/``open`` would:
    0777 for folders and 0666 for files, minus the umask (executable bits kept)."""
    mask = _umask()
    path = Path(path)
    entries = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for entry in entries:
        if entry.is_symlink():
            continue
        if entry.is_dir():
            entry.chmod(0o777 & ~mask)
        else:
            executable = entry.stat().st_mode & 0o111
            entry.chmod((0o666 | executable) & ~mask)


def _host() -> str:
    return socket.gethostname().split(".")[0].replace("-", "_") or "host"


def _tag(kind: str) -> str:
    """``tmp-HOST-PID-`` / ``old-HOST-PID-``: who made a hidden folder, read back by
    :func:`_owner_alive`."""
    return f"{kind}-{_host()}-{os.getpid()}-"


def _owner_alive(name: str) -> bool:
    """Whether the process that made hidden entry ``name`` may still be writing it.

    Entries of other hosts, or of an unknown layout, count as alive (never deleted)."""
    parts = name.rsplit("-", 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return True
    host, pid = parts[1], int(parts[2])
    if host != _host():
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _hidden(path: Path, kind: str) -> list[Path]:
    prefix = f".{path.name}.{kind}-"
    try:
        return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix))
    except (FileNotFoundError, NotADirectoryError):
        return []


def recover_folder(path: str | os.PathLike) -> list[Path]:
    """Repair what a killed :func:`atomic_folder` or :func:`atomic_file` left beside
    ``path``; returns what changed.

    * ``path`` missing and an aside copy of a dead writer present: the kill came between
      the two renames, so the aside copy (the last complete version) is renamed back;
    * aside copies and temporary folders of dead writers are deleted.
    """
    path = Path(path)
    changed = []
    asides = [p for p in _hidden(path, "old") if not _owner_alive(p.name)]
    if not path.exists() and asides:
        newest = max(asides, key=lambda p: p.stat().st_mtime)
        with contextlib.suppress(OSError):
            os.rename(newest, path)
            changed.append(path)
            asides.remove(newest)
    for debris in asides + [p for p in _hidden(path, "tmp") if not _owner_alive(p.name)]:
        if debris.is_dir() and not debris.is_symlink():
            shutil.rmtree(debris, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                debris.unlink()
        changed.append(debris)
    return changed


def temporary_name(path: str | os.PathLike) -> Path:
    """A hidden name beside ``path`` (same suffix) that :func:`recover_folder` recognises as
    this process's temporary file, so it is deleted should the process die."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_tag('tmp')}{os.urandom(4).hex()}{path.suffix}")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    If the body raises (or the process dies), ``path`` keeps its old content, if any: the
    old folder is renamed aside before the new one is renamed in, and deleted only after.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_tag('tmp')}", dir=path.parent))
    try:
        yield tmp
        apply_umask(tmp)
        aside = None
        if path.exists():
            # a fresh empty folder as the aside name: rename(2) replaces an empty folder
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_tag('old')}", dir=path.parent))
            try:
                os.replace(path, aside)
            except BaseException:
                aside.rmdir()
                raise
        try:
            os.replace(tmp, path)
        except BaseException:
            if aside is not None:  # put the old version back
                with contextlib.suppress(OSError):
                    os.replace(aside, path)
                    aside = None
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it over ``path`` on success.

    The temporary file does not exist yet (writers such as ase.db want to create it), so a
    crash never leaves a half-written file under the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_figure_path(option: str, path: str | os.PathLike | None) -> None:
    """Refuse, before any work, a figure path whose suffix names no format matplotlib
    writes (``--out x`` had failed after the work, naming a temporary file)."""
    if path is None:
        return
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ValueError(
            f"{option} {path}: a figure is written as an image; end the name in one of "
            f"{', '.join('.' + name for name in sorted(formats))}"
        )


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """``fig.savefig(path, **kwargs)`` whole or not at all (:func:`atomic_file`); the format
    from ``path``'s suffix (:func:`check_figure_path`)."""
    check_figure_path("figure", path)
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or None, **kwargs)
    return path


def check_readable(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path if it is a readable file (``what="file"``) or folder
    (``what="folder"``); else an :class:`OSError` subclass whose message names the path and
    the problem (missing, a folder where a file is expected, or no read permission)."""
    path = Path(path)
    try:
        path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except PermissionError:
        raise PermissionError(
            f"{path}: no permission to reach it (a folder on its path is not accessible)"
        ) from None
    if what == "file" and path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, a file is expected")
    if what == "file" and not path.is_file():  # a FIFO or device would block or never end
        raise OSError(f"{path}: not a regular file")
    if what == "folder" and not path.is_dir():
        raise NotADirectoryError(f"{path}: is a file, a folder is expected")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: no permission to read it")
    return path


def check_outputs(outputs: dict, inputs=()) -> None:
    """Refuse, before any work, output files that would destroy what a command reads or
    that cannot be written: ``outputs`` maps an option (``"--out"``) to its path (None:
    not written); ``inputs`` are the files and folders the command reads.

    * an output that is an existing folder (it would fail only after the work);
    * an output that is an input file (the same file by any name or link);
    * an output that is an existing file inside an input folder (a model's own
      ``config.json`` or weights): new files beside them are allowed;
    * two outputs that name one file.
    """
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{option} {path}: is a folder; name a file to write")
        target = path.resolve()
        if target in seen:
            raise ValueError(f"{option} and {seen[target]} name one file, {path}")
        seen[target] = option
        if not path.exists():
            continue
        for source in map(Path, inputs):
            if not source.exists():
                continue
            if source.is_dir():
                if target.is_relative_to(source.resolve()):
                    raise ValueError(
                        f"{option} {path}: would overwrite a file of {source}, which this "
                        f"command reads; write elsewhere"
                    )
            elif os.path.samefile(path, source):
                raise ValueError(f"{option} {path}: is the input file {source}; write elsewhere")


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` as a Path if a command can write its files into it (missing, or a
    folder); a clear error, before any work, where it is an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path}: is a file; name a folder for the outputs")
    return path
