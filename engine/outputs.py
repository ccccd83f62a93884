"""Writing outputs: complete or absent, and never over anything depthcut did not write.

Every output is first written to a temporary sibling, ``.NAME.depthcut-PID-XXXXXX.tmp``, and
then renamed into place; a folder is swapped in with one atomic exchange where the kernel
offers it (Linux ``renameat2``), so at no moment is there an incomplete folder, or none,
at NAME. A run killed mid-write leaves only its temporary sibling, and the next run that
writes beside it removes those whose process is gone (and puts back a folder that a crash
between the two renames of the fallback swap left hidden).

An existing output is replaced only when depthcut wrote it or the caller passes
``force=True``: a folder by its manifest (``.depthcut-output``, listing what depthcut put
there; a folder holding anything else is refused), a JSON file by its ``written_by`` field,
a PNG by its Software text, a GGUF file by its ``depthcut.written_by`` key. Outputs never
replace the inputs (a model folder or a parent of one, a text or scores file).
See docs/DESIGN.md, "Safety".
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import struct
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from .errors import DepthcutError

WRITTEN_BY = "depthcut"
MANIFEST = ".depthcut-output"
_TEMP = re.compile(r"^\.(?P<name>.+)\.depthcut-(?P<pid>\d+)-[0-9a-f]+\.(?P<kind>tmp|old)$")


def _abs(path: str | os.PathLike) -> Path:
    """Absolute, without following a final symbolic link (which is refused, not followed)."""
    return Path(os.path.abspath(os.fspath(path)))


def _temp_name(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.depthcut-{os.getpid()}-{secrets.token_hex(3)}.{kind}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- ownership


def check_output(path: str | os.PathLike, *, folder: bool, inputs: Iterable = (), force: bool = False) -> Path:
    """Refuse an output location whose writing would lose something; cheap, so call it before
    slow work. Returns the absolute path."""
    path = _abs(path)
    if not path.name or str(path) == path.anchor:
        raise DepthcutError(f"not a usable output path: {path}")
    for source in inputs:
        if source is None:
            continue
        src = _abs(source).resolve()
        target = path.resolve()
        if target == src or (folder and target in src.parents):
            raise DepthcutError(f"output {path} would replace the input {source}; choose another output")
    if path.is_symlink():
        raise DepthcutError(f"output {path} is a symbolic link; give the real path")
    if not path.exists():
        if path.parent.exists() and not path.parent.is_dir():
            raise DepthcutError(f"cannot write {path}: {path.parent} is not a folder")
        return path
    if folder and not path.is_dir():
        raise DepthcutError(f"output {path} exists and is not a folder")
    if not folder and path.is_dir():
        raise DepthcutError(f"output {path} is a folder; give a file name")
    if force:
        return path
    if folder:
        foreign = foreign_entries(path)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise DepthcutError(f"output folder {path} holds files depthcut did not write ({shown}); "
                                "choose another folder or pass --force to replace it")
    elif not written_by_depthcut(path):
        raise DepthcutError(f"{path} exists and depthcut did not write it; choose another name or pass --force")
    return path


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that its manifest does not list (all of them when it has none)."""
    try:
        listed = set(json.loads((folder / MANIFEST).read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    return sorted(e.name for e in folder.iterdir() if e.name != MANIFEST and e.name not in listed
                  and not _TEMP.match(e.name))


def written_by_depthcut(path: Path) -> bool:
    """Whether depthcut wrote this file, by the mark each format carries."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if head.startswith(b"\x89PNG"):
        return b"tEXtSoftware\x00" + WRITTEN_BY.encode() in head
    if head.startswith(b"GGUF"):
        return _gguf_marked(head)
    if head.lstrip().startswith(b"{"):
        try:
            return json.loads(path.read_text()).get("written_by", "").startswith(WRITTEN_BY)
        except (OSError, ValueError, AttributeError):
            return False
    return False


GGUF_MARK_KEY = "depthcut.written_by"
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_marked(head: bytes, max_keys: int = 8) -> bool:
    """Whether the GGUF header's first key-value pairs (the writer puts the mark right after
    ``general.architecture``) include depthcut's mark; parsing the whole file costs seconds."""
    try:
        n_kv = struct.unpack_from("<Q", head, 16)[0]
        at = 24
        for _ in range(min(n_kv, max_keys)):
            (n,) = struct.unpack_from("<Q", head, at)
            key = head[at + 8: at + 8 + n].decode()
            at += 8 + n
            (vtype,) = struct.unpack_from("<I", head, at)
            at += 4
            if key == GGUF_MARK_KEY:
                return True
            if vtype == 8:  # string
                (n,) = struct.unpack_from("<Q", head, at)
                at += 8 + n
            elif vtype in _GGUF_SCALAR:
                at += _GGUF_SCALAR[vtype]
            else:  # an array: the mark would have come before
                return False
    except (struct.error, UnicodeDecodeError):
        return False
    return False


# ---------------------------------------------------------------- leftovers of killed runs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(folder: Path) -> None:
    """Remove the temporary siblings of depthcut runs that died, and put back a folder a crash
    left hidden between the two renames of a swap."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or _alive(int(m["pid"])):
            continue
        home = entry.with_name(m["name"])
        if m["kind"] == "old" and not home.exists():
            os.replace(entry, home)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# ---------------------------------------------------------------- atomic writes


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem cannot
        return False
    raise OSError(errno, os.strerror(errno), str(a))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the finished folder ``tmp`` at ``path``; the old folder goes only after."""
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp)  # now the old folder
    else:  # two renames; a crash between them is repaired by the next clean_leftovers
        old = _temp_name(path, "old")
        try:
            os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
        shutil.rmtree(old)


@contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False, force: bool = False):
    """Yield a temporary sibling to fill; on success it replaces ``path``, on any failure
    (Ctrl-C and SIGTERM included) it is removed. A folder gets a manifest of what it holds."""
    path = check_output(path, folder=is_dir, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path.parent)
    tmp = _temp_name(path)
    try:
        if is_dir:
            tmp.mkdir()  # with the user's umask, unlike tempfile.mkdtemp's 0700
        else:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        yield tmp
        if is_dir:
            entries = sorted(e.name for e in tmp.iterdir())
            (tmp / MANIFEST).write_text(json.dumps({"written_by": WRITTEN_BY, "entries": entries}, indent=1))
            _swap_in(tmp, path)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def working_folder(path: str | os.PathLike, entries: Iterable[str], force: bool = False) -> Path:
    """A folder depthcut keeps across runs (a training run's checkpoints and log), created or
    reused after the same ownership check as an output."""
    path = check_output(path, folder=True, force=force)
    path.mkdir(parents=True, exist_ok=True)
    manifest = json.dumps({"written_by": WRITTEN_BY, "entries": sorted(entries)}, indent=1)
    atomic_write(path / MANIFEST, manifest.encode(), force=True)
    return path


def atomic_write(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    """Write bytes to a temporary sibling, then rename it over ``path``."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return _abs(path)


def save_chart(fig, path: str | os.PathLike, force: bool = False) -> Path:
    """A matplotlib figure as a PNG marked as depthcut's (its Software chunk), written atomically;
    the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": WRITTEN_BY})
    plt.close(fig)
    return atomic_write(path, buf.getvalue(), force=force)
