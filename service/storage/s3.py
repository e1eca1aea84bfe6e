"""S3 behind the `BlobStore` interface, for `HEADSTART_STORE=s3://bucket/prefix`, and the one
place that configures a boto3 S3 client. Works against AWS S3 and S3-compatible servers that
honour conditional writes (`If-Match` / `If-None-Match` on PutObject: AWS S3, MinIO, SeaweedFS);
`check_conditional_writes` refuses a server that ignores them (rclone's)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from service.config import Settings
from service.storage.blobs import (ConditionalWritesUnsupported, PreconditionFailed,
                                   StoreUnavailable)

_MiB = 1024**2
# Files above 8 MiB go up in 8 MiB parts, read from the file object as they are sent.
_TRANSFER = TransferConfig(multipart_threshold=8 * _MiB, multipart_chunksize=8 * _MiB)
_DELETE_BATCH = 1000  # the most keys one DeleteObjects call takes
_BUCKET_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,255}$")  # what boto3 itself accepts
_MISSING_KEY_CODES = {"NoSuchKey", "NotFound", "404"}  # HEAD answers carry no body: code "404"
# 412: the tag did not match; 409: a concurrent conditional write to the same key won.
_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}

__all__ = ["ConditionalWritesUnsupported", "S3BlobStore", "open_s3_blob_store",
           "parse_s3_location", "s3_client"]


def s3_client(settings: Settings, *, fast: bool = False):
    """A boto3 S3 client configured from settings.

    Credentials are `settings.s3_access_key_id` / `s3_secret_access_key` when set, else the usual
    AWS chain (AWS_ACCESS_KEY_ID …, profiles, instance roles). `fast=True` is for the store, which
    answers API requests: an unreachable server fails in seconds, not minutes.
    """
    if fast:
        # NB: botocore's max_attempts counts retries only; total_max_attempts includes the first.
        patience = dict(connect_timeout=2, read_timeout=10,
                        retries={"total_max_attempts": 2, "mode": "standard"})
    else:
        patience = dict(connect_timeout=5, read_timeout=60,
                        retries={"max_attempts": 3, "mode": "standard"})
    # NB: "when_required" keeps boto3 from sending CRC checksums that S3-compatible servers reject.
    config = Config(s3={"addressing_style": settings.s3_addressing_style},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required", **patience)
    secret = settings.s3_secret_access_key
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url,
                        region_name=settings.s3_region, config=config,
                        aws_access_key_id=settings.s3_access_key_id,
                        aws_secret_access_key=None if secret is None else secret.get_secret_value())


def parse_s3_location(location: str) -> tuple[str, str]:
    """`s3://bucket` or `s3://bucket/some/prefix` → (bucket, prefix without a trailing slash)."""
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/")
    if (not location.startswith("s3://") or not _BUCKET_NAME.match(bucket)
            or (prefix and any(part in ("", ".", "..") for part in prefix.split("/")))):
        raise ValueError("HEADSTART_STORE must be s3://bucket or s3://bucket/prefix. "
                         f"Received: {location}")
    return bucket, prefix


def open_s3_blob_store(location: str, settings: Settings) -> S3BlobStore:
    """The composition root's way to build an S3 store from `HEADSTART_STORE=s3://…`."""
    bucket, prefix = parse_s3_location(location)
    return S3BlobStore(s3_client(settings, fast=True), bucket, prefix)


class S3BlobStore:
    """A bucket, or a prefix in one: key `k` is the object `{prefix}/k`.

    A missing key is a KeyError; an unreachable server, a 5xx, a missing bucket or refused
    credentials is `StoreUnavailable`. PUTs are atomic on S3, so readers never see half an object.
    """

    def __init__(self, client, bucket: str, prefix: str = ""):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix and key else self.prefix or key

    @property
    def _where(self) -> str:
        return f"s3://{self.bucket} at {self.client.meta.endpoint_url}"

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Maps boto3's errors to the store's; anything else (a bug, a bad request) propagates."""
        try:
            yield
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _PRECONDITION_CODES or status in (409, 412):
                raise PreconditionFailed(key or "") from None
            if code == "NoSuchBucket" or (status == 404 and key is None):
                raise StoreUnavailable(f"bucket {self.bucket} does not exist "
                                       f"at {self.client.meta.endpoint_url}") from error
            if code in _MISSING_KEY_CODES and key is not None:
                raise KeyError(key) from None
            if status == 403:
                raise StoreUnavailable(f"access denied to {self._where} ({code}): check the "
                                       "S3 credentials and the bucket policy") from error
            if status >= 500:
                raise StoreUnavailable(f"{self._where} answered {status} {code}") from error
            raise
        except (BotoConnectionError, HTTPClientError) as error:
            raise StoreUnavailable(f"cannot reach {self._where}: {error}") from error
        except NoCredentialsError as error:
            raise StoreUnavailable(f"no credentials for {self._where}: set "
                                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from error

    def put(self, key: str, data: bytes) -> None:
        with self._errors():
            self.client.put_object(Bucket=self.bucket, Key=self._object(key), Body=data)

    def put_file(self, key: str, file: IO[bytes]) -> None:
        """Streams a readable binary file; large ones go up in parts, never whole in memory."""
        with self._errors():
            self.client.upload_fileobj(file, self.bucket, self._object(key), Config=_TRANSFER)

    def get(self, key: str) -> bytes:
        with self._errors(key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._object(key))
            with response["Body"] as body:
                return body.read()

    def get_file(self, key: str, file: IO[bytes]) -> None:
        """Streams the object into a writable binary file; on an error it may hold part of it."""
        with self._errors(key):
            self.client.download_fileobj(self.bucket, self._object(key), file, Config=_TRANSFER)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        with self._errors(key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._object(key))
            with response["Body"] as body:
                return body.read(), response["ETag"]

    def put_if(self, key: str, data: bytes, tag: str | None) -> str:
        """Writes only if the object's ETag is `tag` (None: only if it does not exist)."""
        condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
        with self._errors(key):
            response = self.client.put_object(Bucket=self.bucket, Key=self._object(key),
                                              Body=data, **condition)
        return response["ETag"]

    def delete_if(self, key: str, tag: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._object(key), IfMatch=tag)

    def check_conditional_writes(self) -> None:
        """Probes once that the server refuses mismatching conditional writes.

        Raises:
            ConditionalWritesUnsupported: it accepted a write it should have refused.
        """
        key = f"probes/conditional-{secrets.token_hex(8)}"
        try:
            tag = self.put_if(key, b"1", None)
            for wrong in (None, '"' + "0" * 32 + '"'):
                try:
                    self.put_if(key, b"2", wrong)
                except PreconditionFailed:
                    continue
                raise ConditionalWritesUnsupported(
                    f"{self._where} accepted a PutObject with "
                    f"{'If-None-Match: *' if wrong is None else 'a mismatching If-Match'} over an "
                    "existing object: it ignores conditional writes, so two workers could both "
                    "claim a job. Use AWS S3, MinIO or SeaweedFS (not rclone serve s3).")
            self.put_if(key, b"3", tag)
        finally:
            self.delete(key)

    def exists(self, key: str) -> bool:
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except KeyError:
            return False
        return True

    def _pages(self, prefix: str) -> Iterator[list[str]]:
        """Full object names under `prefix + "/"`, a page (at most 1000) at a time."""
        start = self._object(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{start}/" if start else ""):
            yield [item["Key"] for item in page.get("Contents", [])]

    def list(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._errors():
            return sorted(name[strip:] for page in self._pages(prefix) for name in page)

    def delete(self, key: str) -> None:
        with self._errors():
            self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def delete_prefix(self, prefix: str) -> None:
        with self._errors():
            for page in self._pages(prefix):
                for start in range(0, len(page), _DELETE_BATCH):
                    batch = page[start:start + _DELETE_BATCH]
                    response = self.client.delete_objects(Bucket=self.bucket, Delete={
                        "Objects": [{"Key": name} for name in batch], "Quiet": True})
                    # DeleteObjects answers 200 and lists the keys it could not delete.
                    if failed := response.get("Errors"):
                        raise StoreUnavailable(
                            f"{self._where} could not delete {len(failed)} objects under "
                            f"{prefix}: {failed[0].get('Code')} {failed[0].get('Message')}")

    def ping(self) -> None:
        with self._errors():
            self.client.head_bucket(Bucket=self.bucket)
