"""Where a command may write: outputs never destroy inputs or foreign files.

Every command that writes a directory (``merge``, ``convert``, ``generate``, ``eval``,
``data build``, ``teacher precompute``, ``world build``; ``erase`` through
``train.out_dir`` and its run record) checks its output path with ``output_dir``
before any work:

- an empty path, a path that is a file (or a FIFO, a device), or one under a file is
  an error naming it;
- an output equal to, containing, or inside one of the command's inputs (the base
  model, a delta, the source checkpoint, a pairs file) is always refused, overwrite
  or not;
- an existing, non-empty directory that this command did not write (no marker file
  ``.ear-dist-output.json`` naming the same command) is refused unless the user passed
  ``--overwrite``.

A command that replaces its output writes it under a temp sibling (``.NAME.tmp``) and
renames it into place (``replace_dir``), so a crash leaves the previous output whole.
See docs/safety.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from ear_dist.errors import InputError

MARKER = ".ear-dist-output.json"
PathLike = Union[str, Path]


class OutputPathError(InputError, ValueError):
    """An output path that cannot be used as given (exit 2)."""


def _special(path: Path) -> str:
    """'' for a regular file or directory; else what the path is (a FIFO, a device, a socket)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return ""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return ""


def check_input_file(path: PathLike, what: str) -> Path:
    """A file a command reads: refuse a FIFO, a device or a socket (reading one could hang forever)."""
    p = Path(path)
    kind = _special(p)
    if kind:
        raise InputError(f"{what}: {p} is {kind}, not a regular file; give a file")
    return p


def _blocker(path: Path) -> Optional[tuple[Path, str]]:
    """The first of ``path`` and its parents that exists and is not a directory, with what it is."""
    for anc in [path, *path.parents]:
        if anc.exists() and not anc.is_dir():
            return anc, _special(anc) or "a file"
    return None


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def check_not_an_input(out: Path, protect: Iterable[tuple[str, PathLike]], flag: str) -> None:
    """Refuse an output equal to, containing, or inside an input (label, path); overwrite or not."""
    target = _resolved(out)
    for label, given in protect:
        if given is None or str(given) == "" or not Path(given).expanduser().exists():
            continue  # a preset name, or an input that is not a path
        source = _resolved(given)
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source.is_dir() and source in target.parents:
            relation = "is inside"
        else:
            continue
        raise OutputPathError(f"{flag} {out}: {relation} the {label} {given}; an output never replaces or writes "
                              f"into an input: choose another {flag}")


def read_marker(directory: PathLike) -> Optional[dict]:
    f = Path(directory) / MARKER
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(directory: PathLike, command: str, identity: Optional[dict] = None) -> None:
    """Mark ``directory`` as written by ``ear-dist COMMAND`` (hidden: not copied, not listed as output)."""
    from ear_dist.storage import write_text_atomic

    write_text_atomic(Path(directory) / MARKER, json.dumps({"command": command, "identity": identity or {}}))


def _contents(directory: Path, limit: int = 3) -> str:
    names = sorted(p.name for p in directory.iterdir())
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}"


def directory_path(path: Optional[PathLike], flag: str) -> Path:
    """``path`` made absolute, if it is (or can be made) a directory: not empty, not a file, not under one."""
    if path is None or str(path).strip() == "":
        raise OutputPathError(f"{flag}: empty path; name an output directory")
    out = _resolved(path)
    blocked = _blocker(out)
    if blocked and blocked[0] == out:
        raise OutputPathError(f"{flag} {out}: is {blocked[1]}, not a directory; choose a directory path")
    if blocked:
        raise OutputPathError(f"{flag} {out}: cannot be created, {blocked[0]} is {blocked[1]}; choose another path")
    return out


def output_dir(path: Optional[PathLike], command: str, *, flag: str = "--out", overwrite: bool = False,
               protect: Iterable[tuple[str, PathLike]] = (), identity: Optional[dict] = None,
               overwrite_flag: str = "--overwrite") -> Path:
    """Check the output directory of ``ear-dist COMMAND`` before any work (see the module docstring).

    ``protect``: (label, path) of every input the command reads. ``identity``: what must match
    the marker for a rerun to reuse the directory without ``overwrite`` (None: the command alone).
    Returns the path, made absolute (so ``.`` has a name and a parent).
    """
    out = directory_path(path, flag)
    check_not_an_input(out, protect, flag)
    if out == Path(out.anchor):
        raise OutputPathError(f"{flag} {out}: the file system root is never an output directory")
    if out.is_dir() and any(p.name not in (MARKER, MARKER + ".tmp") for p in out.iterdir()):
        marker = read_marker(out)
        ours = marker is not None and marker.get("command") == command and (
            identity is None or marker.get("identity") == identity)
        if not ours and overwrite:
            _refuse_home_or_working_dir(out, flag)
        if not ours and not overwrite:
            by = (f"written by `ear-dist {marker.get('command')}`" if marker and marker.get("command") != command
                  else "written by another run of other settings" if marker
                  else f"not written by `ear-dist {command}`")
            raise OutputPathError(f"{flag} {out}: exists ({_contents(out)}) and was {by}; pass {overwrite_flag} to "
                                  f"replace it, or choose another {flag}")
    return out


def _refuse_home_or_working_dir(out: Path, flag: str) -> None:
    """--overwrite replaces a directory: never the home directory, the working directory or one holding it."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if out == home or out in home.parents:
        raise OutputPathError(f"{flag} {out}: is (or holds) the home directory; --overwrite never replaces it: choose "
                              f"another {flag}")
    if out == cwd or out in cwd.parents:
        raise OutputPathError(f"{flag} {out}: is (or holds) the working directory; --overwrite never replaces it: "
                              f"choose another {flag}")


def temp_sibling(out: Path) -> Path:
    """An empty temp directory beside ``out`` (same file system: the rename into place is atomic)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def removed_on_error(tmp: Path) -> Iterator[Path]:
    """``tmp`` (a ``temp_sibling``) for the block; removed if the block fails (a full disk, a bad input, Ctrl-C),
    so a failed write leaves neither a finished-looking output nor its temp directory."""
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out``; a previous ``out`` is removed only once the new one is in place."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def finish_dir(tmp: Path, out: Path, command: str, identity: Optional[dict] = None) -> Path:
    """Mark ``tmp``, give its files the user's umask, and rename it into place at ``out``."""
    from ear_dist.storage import apply_umask

    write_marker(tmp, command, identity)
    apply_umask(tmp)
    replace_dir(tmp, out)
    return out


def output_file(path: PathLike, flag: str, protect: Iterable[tuple[str, PathLike]] = ()) -> Path:
    """A single output file: not a directory, not under a file, never one of the inputs."""
    if str(path).strip() == "":
        raise OutputPathError(f"{flag}: empty path; name an output file")
    out = _resolved(path)
    if out.is_dir():
        raise OutputPathError(f"{flag} {out}: is a directory; name a file")
    if _special(out):
        raise OutputPathError(f"{flag} {out}: is {_special(out)}, not a regular file")
    blocked = _blocker(out.parent)
    if blocked:
        raise OutputPathError(f"{flag} {out}: cannot be created, {blocked[0]} is {blocked[1]}; choose another path")
    check_not_an_input(out, protect, flag)
    return out
