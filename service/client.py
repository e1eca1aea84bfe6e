"""A small Python client for Headstart's HTTP API; the `headstart` CLI is built on it.

    from service.client import Client

    with Client("http://localhost:8000", key=None) as headstart:
        classifier = headstart.create("photos/", name="ants-vs-bees")   # a folder or a .zip
        headstart.wait(classifier["id"])                                # follows the events
        print(headstart.predict(classifier["id"], ["ant.jpg"])["predictions"][0]["label"])

Every method returns the API's JSON document as a `Document` (a dict that also keeps the text
the server sent). A problem response raises `ApiError` with its title, detail and status; a
server that cannot be reached raises `Unreachable`. A folder is zipped while it is uploaded, a
chunk at a time: the archive is never whole in memory. Only HTTP here: no TensorFlow, numpy or
Pillow is imported.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://localhost:8000"
#: Most images the client sends in one predict request (the server's default limit is 64).
PREDICT_BATCH = 32
#: Bytes read from a file, and at most about this many yielded, per chunk of an upload.
CHUNK_BYTES = 1024 * 1024
#: A stream's read timeout: well above the server's keep-alive interval (15 s by default).
STREAM_READ_TIMEOUT_S = 60.0
#: How long `events` keeps asking a server whose event stream slots are all taken (503).
BUSY_RETRY_S = 60.0
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"}

UploadCallback = Callable[[int, int | None], None]


class ClientError(Exception):
    """Anything that kept a call from getting its answer."""


class Unreachable(ClientError):
    """The server could not be reached, or stopped answering (connection refused, timeout)."""


class ApiError(ClientError):
    """The server answered with a problem (RFC 9457): `status`, `title`, `detail`, `errors`."""

    def __init__(self, status: int, title: str, detail: str,
                 errors: list[dict[str, Any]] | None = None,
                 problem: dict[str, Any] | None = None):
        super().__init__(f"{title} ({status}): {detail}")
        self.status, self.title, self.detail, self.errors = status, title, detail, errors
        self.problem = problem if problem is not None else {
            "type": "about:blank", "title": title, "status": status, "detail": detail}


class Document(dict):
    """The JSON document of a response; `text` is the body exactly as the server sent it."""

    def __init__(self, data: dict[str, Any], text: str):
        super().__init__(data)
        self.text = text


@dataclass(frozen=True)
class Event:
    """One server-sent event of a classifier: `kind` status, progress, epoch, version or done."""

    kind: str
    data: dict[str, Any]
    id: str | None


class Client:
    """Headstart's API over HTTP. Use it as a context manager, or call `close()`.

    Args:
        url: the service's base URL, e.g. http://localhost:8000.
        key: an API key, sent as `Authorization: Bearer <key>`; None for an open server.
        timeout: seconds to connect and for each read, for calls other than event streams.
    """

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, *,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------ classifiers

    def create(self, dataset: str | os.PathLike, *, name: str | None = None,
               options: dict[str, Any] | None = None,
               on_upload: UploadCallback | None = None) -> Document:
        """Uploads a dataset and queues its training: a folder of label folders (zipped on the
        fly) or a .zip file (sent as it is). Returns the queued classifier.

        Args:
            options: training options (see the API); `name` overrides options["name"].
            on_upload: called as chunks go out with (bytes sent, bytes in all or None).

        Raises:
            ValueError: `dataset` is neither a folder nor a .zip file.
        """
        options = dict(options or {})
        if name is not None:
            options["name"] = name
        return self._upload("/v1/classifiers", dataset, options, on_upload)

    def _upload(self, url: str, dataset: str | os.PathLike | None, options: dict[str, Any],
                on_upload: UploadCallback | None, *,
                params: dict[str, Any] | None = None) -> Document:
        """POSTs a multipart form of `options` and a dataset: a folder (zipped on the fly), a
        .zip file (sent as it is), or none."""
        form = Multipart()
        if options:
            form.add("options", json.dumps(options).encode())
        source_size = archive_size = None
        if dataset is not None:
            path = Path(dataset)
            if path.is_dir():
                files = dataset_files(path)
                if not files:
                    raise ValueError(f"{path}: the folder holds no files")
                archive: Iterable[bytes] = zip_stream(files)
                source_size = sum(file.stat().st_size for _, file in files)
            elif path.is_file() and path.suffix.lower() == ".zip":
                archive, archive_size = _file_chunks(path), path.stat().st_size
            elif path.exists():
                raise ValueError(f"{path}: give a folder of label folders or a .zip file")
            else:
                raise ValueError(f"{path}: no such file or folder")
            form.add("dataset", archive, filename=f"{path.stem or 'dataset'}.zip",
                     content_type="application/zip", size=archive_size)
        body = _counting(form.chunks(), on_upload, source_size if archive_size is None
                         and dataset is not None else form.length())
        headers = {"Content-Type": form.content_type}
        if form.length() is not None:
            headers["Content-Length"] = str(form.length())
        # NB: without a length, httpx sends the folder's zip with chunked transfer encoding,
        # which gunicorn accepts and Werkzeug reads to its end (wsgi.input_terminated).
        return self._document("POST", url, content=body, headers=headers, params=params)

    def list(self) -> Document:
        """`{"classifiers": [...]}`, newest first."""
        return self._document("GET", "/v1/classifiers")

    def get(self, classifier_id: str) -> Document:
        """The classifier: status, progress, labels, metrics."""
        return self._document("GET", f"/v1/classifiers/{_segment(classifier_id)}")

    def report(self, classifier_id: str) -> Document:
        """The training report (409 until the first head is served: status ready)."""
        return self._document("GET", f"/v1/classifiers/{_segment(classifier_id)}/report")

    def delete(self, classifier_id: str) -> None:
        """Cancels training if it runs and deletes everything of the classifier."""
        self._send("DELETE", f"/v1/classifiers/{_segment(classifier_id)}")

    def suggest(self, classifier_id: str, images: str | os.PathLike, *, limit: int | None = None,
                method: str | None = None, on_upload: UploadCallback | None = None) -> Document:
        """Ranks unlabeled images (a folder, any subfolders, zipped as it uploads, or a .zip)
        by how much a label would teach the classifier: `{"method", "images",
        "suggestions": [{"path", "uncertainty", "label", "score", "out_of_distribution"}]}`,
        most useful first; `limit` (server default 20) and `method` ("margin" or "entropy")."""
        params = {name: value for name, value in (("limit", limit), ("method", method))
                  if value is not None}
        return self._upload(f"/v1/classifiers/{_segment(classifier_id)}/suggest", images, {},
                            on_upload, params=params)

    # ------------------------------------------------------------ versions and aliases

    def add_version(self, classifier_id: str, dataset: str | os.PathLike | None = None, *,
                    options: dict[str, Any] | None = None,
                    on_upload: UploadCallback | None = None) -> Document:
        """Queues a new version: the base version's images plus `dataset` (a folder or .zip;
        None: the same images), `options` as the API's (training options, base, replace,
        promote). Returns the queued version."""
        return self._upload(f"/v1/classifiers/{_segment(classifier_id)}/versions", dataset,
                            dict(options or {}), on_upload)

    def versions(self, classifier_id: str) -> Document:
        """`{"versions": [...]}`, newest first."""
        return self._document("GET", f"/v1/classifiers/{_segment(classifier_id)}/versions")

    def version(self, classifier_id: str, version: int) -> Document:
        return self._document("GET", f"/v1/classifiers/{_segment(classifier_id)}/versions/"
                                     f"{int(version)}")

    def alias(self, classifier_id: str, name: str, version: int) -> Document:
        """Points an alias at a version; `production` is what predict uses by default."""
        return self._document("PUT", f"/v1/classifiers/{_segment(classifier_id)}/aliases/"
                                     f"{_segment(name)}", json={"version": int(version)})

    def wait_version(self, classifier_id: str, version: int, *, poll_s: float = 1.0,
                     on_poll: Callable[[Document], None] = lambda document: None) -> Document:
        """Polls a version until it has finished training and its promotion is settled."""
        while True:
            document = self.version(classifier_id, version)
            on_poll(document)
            if document["status"] in ("failed", "cancelled") or \
                    document.get("promotion") is not None or \
                    (document["status"] == "ready" and document["version"] == 1):
                return document
            time.sleep(poll_s)

    def export(self, classifier_id: str, format: str, target: str | os.PathLike | None = None, *,
               version: int | None = None, timeout_s: float = 900,
               on_wait: Callable[[float], None] = lambda seconds: None) -> Path:
        """Downloads the classifier as a zip to run elsewhere (`format`: savedmodel, tflite,
        onnx), polling while the server builds it (202 + Retry-After); streams it to `target`
        (default: the server's file name, in the current folder). Returns the path written."""
        params = {"format": format, **({"version": version} if version else {})}
        path = f"/v1/classifiers/{_segment(classifier_id)}/export"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self._http.stream("GET", path, params=params) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _problem(response)
                    if response.status_code == 202:
                        wait = float(response.headers.get("Retry-After", "5"))
                        if time.monotonic() + wait > deadline:
                            raise ClientError(f"the export of {classifier_id} was not ready "
                                              f"within {timeout_s:g} s")
                        on_wait(wait)
                        time.sleep(wait)
                        continue
                    name = _attachment_name(response.headers.get("Content-Disposition", ""))
                    out = Path(target) if target else Path(name or f"{classifier_id}-{format}.zip")
                    partial = out.with_name(out.name + ".part")
                    with open(partial, "wb") as file:
                        for chunk in response.iter_bytes():
                            file.write(chunk)
                    partial.replace(out)
                    return out
            except httpx.TransportError as error:
                raise _unreachable(self.url, error) from None

    def predict(self, classifier_id: str, images: Sequence[str | os.PathLike | tuple[str, bytes]],
                *, top_k: int | None = None, threshold: float | None = None,
                version: int | None = None, alias: str | None = None,
                batch_size: int = PREDICT_BATCH) -> Document:
        """Labels and scores for each image, in order: file paths or (name, bytes) pairs, sent
        in requests of at most `batch_size` images. One request's document is returned as the
        server sent it; several are joined into one of the same shape."""
        if not images:
            raise ValueError("give at least one image")
        query = {name: value for name, value in (("top_k", top_k), ("threshold", threshold),
                                                 ("version", version), ("alias", alias))
                 if value is not None}
        path = f"/v1/classifiers/{_segment(classifier_id)}/predict"
        answers = []
        for start in range(0, len(images), batch_size):
            form, names = Multipart(), []
            for image in images[start:start + batch_size]:
                name, data = image if isinstance(image, tuple) else \
                    (str(image), Path(image).read_bytes())
                names.append(name)
                form.add("image", data, filename=Path(name).name,
                         content_type="application/octet-stream")
            try:
                answers.append(self._document("POST", path, params=query,
                                              content=b"".join(form.chunks()),
                                              headers={"Content-Type": form.content_type}))
            except ApiError as error:
                raise _naming_images(error, names) from None
        if len(answers) == 1:
            return answers[0]
        joined = {**answers[0], "predictions": [p for a in answers for p in a["predictions"]]}
        return Document(joined, json.dumps(joined, ensure_ascii=False))

    # ------------------------------------------------------------ events

    def events(self, classifier_id: str, *, last_event_id: str | None = None,
               reconnect: bool = True) -> Iterator[Event]:
        """The classifier's server-sent events until `done`.

        A stream that ends early (the server's time limit, a dropped connection) is resumed
        from the last event's id, so nothing is missed or repeated, and a server with all its
        stream slots taken (503) is asked again after its Retry-After, for up to a minute;
        `reconnect=False` stops at the first end instead.
        """
        path = f"/v1/classifiers/{_segment(classifier_id)}/events"
        timeout = httpx.Timeout(self._http.timeout.connect, read=STREAM_READ_TIMEOUT_S)
        busy_until = None
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if response.status_code == 204:  # resumed after done: nothing left
                        return
                    if response.status_code == 503 and reconnect:
                        busy_until = busy_until or time.monotonic() + BUSY_RETRY_S
                        if time.monotonic() < busy_until:
                            time.sleep(_retry_after(response))
                            continue
                    if response.status_code >= 400:
                        response.read()
                        raise _problem(response)
                    busy_until = None
                    for event in parse_events(response.iter_lines()):
                        last_event_id = event.id or last_event_id
                        yield event
                        if event.kind == "done":
                            return
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout) as error:
                if not reconnect or last_event_id is None:
                    raise Unreachable(f"the event stream from {self.url} broke: {error}") \
                        from None
                time.sleep(1.0)
            except httpx.TransportError as error:
                raise _unreachable(self.url, error) from None
            if not reconnect:
                return

    def wait(self, classifier_id: str,
             on_event: Callable[[Event], None] | None = None) -> Document:
        """Follows the events until training has finished; returns the final classifier."""
        for event in self.events(classifier_id):
            if on_event is not None:
                on_event(event)
        return self.get(classifier_id)

    # ------------------------------------------------------------ plumbing

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise _unreachable(self.url, error) from None
        if response.status_code >= 400:
            raise _problem(response)
        return response

    def _document(self, method: str, path: str, **kwargs) -> Document:
        response = self._send(method, path, **kwargs)
        try:
            return Document(response.json(), response.text)
        except ValueError:
            raise ClientError(f"{method} {path}: the server answered {response.status_code} "
                              f"with a body that is not JSON: {response.text[:200]!r}") from None


def _attachment_name(disposition: str) -> str | None:
    """The file name of a `Content-Disposition: attachment; filename=…`, as a bare name."""
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "filename" and value:
            return Path(value.strip('"')).name or None
    return None


def _segment(classifier_id: str) -> str:
    """An id as one path segment: whatever a user types cannot reach another route."""
    return quote(classifier_id, safe="")


def _problem(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "title" in body:
        return ApiError(body.get("status", response.status_code), str(body["title"]),
                        str(body.get("detail", "")), body.get("errors"), body)
    return ApiError(response.status_code, response.reason_phrase or "Error",
                    response.text.strip()[:500] or f"HTTP {response.status_code}")


def _naming_images(error: ApiError, names: Sequence[str]) -> ApiError:
    """`error` with the server's "image.N" (N: the place in one request) turned into the
    file the caller gave, so a refused image among hundreds can be found."""
    named = []
    for entry in error.errors or []:
        field = str(entry.get("field", ""))
        index = field.removeprefix("image.")
        if field.startswith("image.") and index.isdigit() and int(index) < len(names):
            entry = {**entry, "file": names[int(index)]}
        named.append(entry)
    files = [entry["file"] for entry in named if "file" in entry]
    if not files:
        return error
    detail = "; ".join(f"{entry['file']}: {entry.get('message', '')}" for entry in named
                       if "file" in entry)
    return ApiError(error.status, error.title, detail, named,
                    {**error.problem, "detail": detail, "errors": named})


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("Retry-After", "5")), 0.5), 30.0)
    except ValueError:
        return 5.0


def _unreachable(url: str, error: httpx.TransportError) -> Unreachable:
    if isinstance(error, httpx.ConnectError):
        reason = str(error).split("] ")[-1] or "connection failed"
        return Unreachable(f"cannot connect to {url}: {reason}")
    if isinstance(error, httpx.TimeoutException):
        return Unreachable(f"{url} did not answer in time ({type(error).__name__})")
    return Unreachable(f"{url}: {type(error).__name__}: {error}")


def parse_events(lines: Iterable[str]) -> Iterator[Event]:
    """Server-sent events from a stream's lines (WHATWG rules; comments and `retry:` skipped)."""
    kind, event_id, data = "message", None, []
    for line in lines:
        if not line:
            if data:
                yield Event(kind, json.loads("\n".join(data)), event_id)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            event_id = value


# ------------------------------------------------------------ uploads


def dataset_files(folder: Path) -> list[tuple[str, Path]]:
    """(name in the archive, file) for every file under `folder`, sorted; hidden files and
    folders (dotfiles, .git, .DS_Store) are left out."""
    files = []
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(names):
            path = Path(root) / name
            if not name.startswith(".") and path.is_file():
                files.append((path.relative_to(folder).as_posix(), path))
    return files


class _Chunks:
    """A write-only file for zipfile: keeps what is written until `take()` hands it out."""

    def __init__(self):
        self._parts: list[bytes] = []
        self._written = 0

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def zip_stream(files: Sequence[tuple[str, Path]],
               chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A zip of `files` (name in the archive, path), yielded as it is written: at most about
    `chunk_bytes` of it is held at once. Members are stored, not deflated: images are already
    compressed, and the server reads the archive as it arrives."""
    sink = _Chunks()
    # NB: _Chunks cannot seek, so zipfile writes each member's sizes and CRC after its data.
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, path in files:
            info = zipfile.ZipInfo.from_file(path, name, strict_timestamps=False)
            info.compress_type = zipfile.ZIP_STORED
            with path.open("rb") as source, archive.open(info, "w") as member:
                while block := source.read(chunk_bytes):
                    member.write(block)
                    if data := sink.take():
                        yield data
            if data := sink.take():
                yield data
    if data := sink.take():
        yield data


def _file_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    with path.open("rb") as file:
        while block := file.read(chunk_bytes):
            yield block


class Multipart:
    """A multipart/form-data body built from parts whose content may be a stream of chunks."""

    def __init__(self):
        self.boundary = "headstart-" + secrets.token_hex(16)
        self._parts: list[tuple[bytes, Iterable[bytes] | bytes, int | None]] = []

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def add(self, name: str, content: Iterable[bytes] | bytes, *, filename: str | None = None,
            content_type: str | None = None, size: int | None = None) -> None:
        disposition = f'form-data; name="{_quoted(name)}"'
        if filename is not None:
            disposition += f'; filename="{_quoted(filename)}"'
        head = f"--{self.boundary}\r\nContent-Disposition: {disposition}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        if isinstance(content, bytes):
            size = len(content)
        self._parts.append(((head + "\r\n").encode(), content, size))

    def length(self) -> int | None:
        """The body's length in bytes, or None when a part's size is not known beforehand."""
        if any(size is None for _, _, size in self._parts):
            return None
        return sum(len(head) + size + 2 for head, _, size in self._parts) + \
            len(self._closing())

    def chunks(self) -> Iterator[bytes]:
        for head, content, _ in self._parts:
            yield head
            if isinstance(content, bytes):
                yield content
            else:
                yield from content
            yield b"\r\n"
        yield self._closing()

    def _closing(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()


def _quoted(text: str) -> str:
    # NB: as browsers do (HTML's multipart encoding): quotes and line breaks percent-encoded.
    return text.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def _counting(chunks: Iterable[bytes], on_upload: UploadCallback | None,
              total: int | None) -> Iterator[bytes]:
    sent = 0
    for chunk in chunks:
        yield chunk
        sent += len(chunk)
        if on_upload is not None:
            on_upload(min(sent, total) if total else sent, total)


def expand_images(patterns: Iterable[str]) -> list[Path]:
    """Files named, and files matching glob patterns (for shells that do not expand them), in
    order, each once. A folder stands for the images directly in it.

    Raises:
        ValueError: a name that is not a file and a pattern that matches nothing.
    """
    found: dict[Path, None] = {}
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            found[path] = None
        elif path.is_dir():
            images = sorted(p for p in path.iterdir()
                            if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
            if not images:
                raise ValueError(f"{pattern}: the folder holds no images")
            found.update(dict.fromkeys(images))
        elif glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True)
                             if Path(p).is_file())
            if not matches:
                raise ValueError(f"{pattern}: no file matches")
            found.update(dict.fromkeys(matches))
        else:
            raise ValueError(f"{pattern}: no such file")
    return list(found)
