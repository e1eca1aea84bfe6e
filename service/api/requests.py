"""The request class of the app: Flask's, closing every file a body was spooled to."""

from __future__ import annotations

import typing

import flask


class Request(flask.Request):
    """Werkzeug closes the files of a parsed form when the request ends, but not one it was
    writing when parsing failed (a limit hit, the disk full, a client too slow): that file, and
    the disk space it holds, waited for the garbage collector. This request closes every file
    it was given."""

    _spooled: list[typing.IO[bytes]] | None = None

    def _get_file_stream(self, *args, **kwargs) -> typing.IO[bytes]:
        stream = super()._get_file_stream(*args, **kwargs)
        if self._spooled is None:
            self._spooled = []
        self._spooled.append(stream)
        return stream

    def close(self) -> None:
        super().close()
        for stream in self._spooled or ():
            stream.close()
        self._spooled = None
