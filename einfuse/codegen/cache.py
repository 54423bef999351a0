"""The disk cache: generated kernel sources and compiled results, keyed by content and versions.

Every entry is a directory of files plus `.entry.json` holding each file's sha256. Writes go to a
temporary name and are renamed into place, so a reader never sees half a file and two processes
writing the same entry both succeed; an entry whose files do not match their checksums is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache


ENTRY = ".entry.json"  # per entry: each file's checksum; written last, so it marks a complete entry


def cache_root() -> str:
    return os.environ.get("EINFUSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "einfuse")


@lru_cache(maxsize=1)
def versions() -> str:
    """torch, triton and einfuse versions, and a hash of einfuse's own source: part of every key, so
    an upgrade (or a local edit of lowering, passes or codegen) never reuses stale IR or kernels."""
    import torch
    import triton

    from .. import __version__

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(package)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return f"torch={torch.__version__};triton={triton.__version__};einfuse={__version__};source={h.hexdigest()[:12]}"


def key_of(*parts: str) -> str:
    h = hashlib.sha256(versions().encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()[:24]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: str, data: bytes) -> None:
    """Write `path` so readers see the old file or the whole new one, never a part."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class Cache:
    """A namespace (`kernels`, `modules`, `aot`, ...) of checksummed entries under the cache root."""

    def __init__(self, namespace: str, root: str | None = None):
        self.dir = os.path.join(root or cache_root(), namespace)
        self.hits = self.misses = self.rebuilt = 0

    def path(self, key: str) -> str:
        return os.path.join(self.dir, key)

    def get(self, key: str) -> dict | None:
        """The entry's files (name -> bytes), or None when missing or corrupt (a corrupt one is removed)."""
        d = self.path(key)
        try:
            with open(os.path.join(d, ENTRY)) as f:
                meta = json.load(f)
            files = {}
            for name, digest in meta["files"].items():
                with open(os.path.join(d, name), "rb") as f:
                    data = f.read()
                if _sha(data) != digest:
                    raise ValueError(f"checksum mismatch in {name}")
                files[name] = data
        except FileNotFoundError:
            self.misses += 1
            return None
        except (ValueError, KeyError, json.JSONDecodeError, OSError):
            self.rebuilt += 1
            shutil.rmtree(d, ignore_errors=True)
            return None
        self.hits += 1
        return files

    def put(self, key: str, files: dict) -> str:
        """Store files (name -> bytes or str); the checksum file is written last."""
        d = self.path(key)
        blobs = {n: (v.encode() if isinstance(v, str) else v) for n, v in files.items()}
        for name, data in blobs.items():
            atomic_write(os.path.join(d, name), data)
        meta = {"files": {n: _sha(b) for n, b in blobs.items()}, "versions": versions()}
        atomic_write(os.path.join(d, ENTRY), json.dumps(meta, indent=1).encode())
        return d
