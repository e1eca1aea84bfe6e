"""Bytes under keys: the `BlobStore` interface, its errors, and the local-directory store.

Keys are '/'-separated paths built by `ClassifierStore`, never by user input. Every write is
atomic (a reader sees the old or the new object, never part of one), and `put_if` is a
compare-and-set on an object's version tag: the job protocol is built on it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import shutil
import tempfile
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

from service.errors import ServiceUnavailable


class StoreUnavailable(ServiceUnavailable):
    """The store cannot be reached or written; the request can be retried later."""

    title = "Store unavailable"

    def __init__(self, detail: str):
        super().__init__(detail, headers={"Retry-After": "5"})


class PreconditionFailed(Exception):
    """A conditional write found another version than the one it was conditioned on."""


class ConditionalWritesUnsupported(RuntimeError):
    """The store accepts conditional writes it does not honour: leases would not be safe, so
    the service refuses to start on it (`S3BlobStore.check_conditional_writes`)."""


class BlobStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, file: IO[bytes]) -> None: ...   # streams from file
    def get(self, key: str) -> bytes: ...          # raises KeyError when absent
    def get_file(self, key: str, file: IO[bytes]) -> None: ...   # streams into file; KeyError
    def get_versioned(self, key: str) -> tuple[bytes, str]: ...  # (data, tag); KeyError
    def put_if(self, key: str, data: bytes, tag: str | None) -> str: ...
    def delete_if(self, key: str, tag: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...  # keys under prefix, sorted
    def delete(self, key: str) -> None: ...        # no error when absent
    def delete_prefix(self, prefix: str) -> None: ...
    def ping(self) -> None: ...                    # raises StoreUnavailable


def content_tag(data: bytes) -> str:
    """The local store's version tag of an object: a hash of its bytes."""
    return hashlib.sha256(data).hexdigest()[:32]


class LocalBlobStore:
    """A directory. Writes go to a temp file in the same folder, then `os.replace`, then the
    folder is fsynced: atomic and durable. `put_if` holds an exclusive `flock` on a lock file
    beside the object while it compares and swaps, so processes on this machine agree."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def put(self, key: str, data: bytes) -> None:
        self.put_file(key, io.BytesIO(data))

    def put_file(self, key: str, source: IO[bytes]) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as file:
                    shutil.copyfileobj(source, file)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temp, path)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
            _fsync_directory(path.parent)  # NB: else the rename itself can be lost on power loss
        except OSError as error:
            raise _unavailable("write to", error) from error

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise KeyError(key) from None
        except OSError as error:
            raise _unavailable("read", error) from error

    def get_file(self, key: str, target: IO[bytes]) -> None:
        try:
            with self._path(key).open("rb") as file:
                shutil.copyfileobj(file, target)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyError(key) from None
        except OSError as error:
            raise _unavailable("read", error) from error

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, content_tag(data)

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".lock-{path.name}"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _current_tag(self, key: str) -> str | None:
        try:
            return content_tag(self._path(key).read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return None

    def put_if(self, key: str, data: bytes, tag: str | None) -> str:
        """Writes only if the object's tag is `tag` (None: only if it does not exist)."""
        if tag is not None and not self._path(key).is_file():
            raise PreconditionFailed(key)  # NB: and no lock file left in a deleted folder
        try:
            with self._locked(key):
                if self._current_tag(key) != tag:
                    raise PreconditionFailed(key)
                self.put(key, data)
        except OSError as error:
            raise _unavailable("write to", error) from error
        return content_tag(data)

    def delete_if(self, key: str, tag: str) -> None:
        try:
            with self._locked(key):
                if self._current_tag(key) != tag:
                    raise PreconditionFailed(key)
                self._path(key).unlink(missing_ok=True)
        except OSError as error:
            raise _unavailable("delete from", error) from error

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            path.relative_to(self.root).as_posix() for path in base.rglob("*")
            if path.is_file() and not path.name.startswith((".tmp-", ".lock-")))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except NotADirectoryError:
            pass
        except OSError as error:
            raise _unavailable("delete from", error) from error

    def delete_prefix(self, prefix: str) -> None:
        try:
            shutil.rmtree(self._path(prefix))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise _unavailable("delete from", error) from error

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".tmp-ping"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            if error.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.ENOENT):
                raise StoreUnavailable(f"store directory {self.root} is not writable: "
                                       f"{error.strerror}") from error
            raise StoreUnavailable(f"store directory {self.root}: {error}") from error


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unavailable(action: str, error: OSError) -> StoreUnavailable:
    return StoreUnavailable(f"cannot {action} the store: {error.strerror or error}")
