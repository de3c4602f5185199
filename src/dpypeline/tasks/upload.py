"""Raw files to an object store: ``upload_file`` (a job task) and ``create_bucket`` (setup).

An upload is verified end to end without trusting any one store's ETag rules:

* the file is read once before sending, for its SHA-256 and the MD5 of each part;
* every request carries ``Content-MD5`` from that pass, so a store that checks it (AWS S3
  and most S3-compatible stores) rejects a body that differs from what was hashed - a
  file changed between the passes, a corrupted transfer;
* the SHA-256 is stored as object metadata (``x-amz-meta-sha256``); afterwards the
  object's size, that metadata and - where it has the usual MD5 form - its ETag (MD5 of
  the body; for multipart uploads MD5 of the parts' MD5s, then ``-N``) are compared. This
  also catches what a store ignoring ``Content-MD5`` (moto does) let through.

The same metadata lets a replayed job skip a file that is already there, byte for byte.
Files of at least ``multipart_threshold`` go up in parts of that size (kept within 5 MiB
to 64 MiB, and at most 10,000 parts), one part in memory at a time, one after another;
smaller files go in one request, read into memory whole (so keep the threshold moderate).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dpypeline.commits import Commit, commits
from dpypeline.errors import ConfigError, PermanentError, TransientError
from dpypeline.objectstore import check_bucket, classify_errors, filesystem, s3_error_code

if TYPE_CHECKING:
    import s3fs

    from dpypeline.config.model import ObjectStoreConfig
    from dpypeline.pipeline import JobContext, SetupContext

__all__ = ["create_bucket", "object_key", "parse_size", "upload_file"]

MIN_PART = 5 * 2**20  # S3's smallest part (all but the last)
MAX_PART = 64 * 2**20  # one part is held in memory
MAX_PARTS = 10_000
MAX_SINGLE = 5 * 2**30  # S3's largest single PUT
MAX_KEY_BYTES = 1024
_BLOCK = 2**20
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*([a-z]*)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MD5_ETAG = re.compile(r"[0-9a-f]{32}(-\d+)?")


def create_bucket(bucket: str, objectstore: str, context: SetupContext | None = None) -> str:
    """Make *bucket* on *objectstore* unless it exists; safe to run at every start."""
    check_bucket(bucket)
    stores = _stores(context, objectstore)
    fs = filesystem(stores, objectstore)
    url = f"s3://{bucket}"
    with classify_errors(
        f"creating {url}", objectstore=objectstore, config=stores.get(objectstore)
    ):
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
            return url
        except FileNotFoundError:
            pass
        region = fs.client_kwargs.get("region_name")
        options: dict[str, Any] = {"Bucket": bucket}
        if region and region != "us-east-1":  # us-east-1 is the default and must not be named
            options["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            fs.call_s3("create_bucket", **options)
        except FileExistsError as exc:
            if s3_error_code(exc) != "BucketAlreadyOwnedByYou":  # ours, made meanwhile: fine
                raise PermanentError(
                    f"bucket name '{bucket}' is taken by another account of the object store;"
                    " choose another name"
                ) from exc
    _log(context, "bucket_created", bucket=bucket, objectstore=objectstore)
    return url


def _destination(kwargs: Mapping[str, Any]) -> Commit | None:
    """Uploads commit to their bucket and prefix, one at a time. In any order of files:
    each has a key of its own, so a failed upload holds back no other."""
    bucket, prefix = kwargs.get("bucket"), kwargs.get("prefix") or ""
    if not isinstance(bucket, str) or not isinstance(prefix, str):
        return None  # upload_file refuses it itself, with the reason
    return Commit(f"s3://{bucket}/{prefix.strip('/')}".rstrip("/"))


@commits(_destination)
def upload_file(
    path: str,
    *,
    objectstore: str,
    bucket: str,
    prefix: str = "",
    multipart_threshold: str | int = "64MB",
    context: JobContext | None = None,
) -> str:
    """Copy the file at *path* to ``s3://BUCKET/PREFIX/RELPATH`` and return that URL.

    RELPATH is the file's path relative to its watch root (its name without a context); a
    path that would leave the prefix is refused. An identical object already there (same
    size and SHA-256) is left alone.
    """
    threshold = parse_size(multipart_threshold)
    check_bucket(bucket)
    key = object_key(prefix, context.relpath if context is not None else os.path.basename(path))
    url = f"s3://{bucket}/{key}"
    stores = _stores(context, objectstore)
    fs = filesystem(stores, objectstore)
    digest = _Digest.of(path, threshold)
    started = time.monotonic()
    with classify_errors(
        f"uploading {path} to {url}", objectstore=objectstore, config=stores.get(objectstore)
    ):
        if _matches(_head(fs, bucket, key), digest):
            _log(context, "upload_skipped", url=url, bytes=digest.size)
            return url
        try:
            if digest.multipart:
                _put_parts(fs, bucket, key, path, digest)
            else:
                with open(path, "rb") as stream:
                    body = stream.read(digest.size)
                fs.call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=body,
                    ContentMD5=_b64(digest.md5s[0]), Metadata={"sha256": digest.sha256},
                )  # fmt: skip
        except OSError as exc:
            if s3_error_code(exc) not in ("BadDigest", "InvalidDigest"):
                raise
            raise TransientError(f"{path} changed while it was uploaded to {url}") from exc
        head = _head(fs, bucket, key)
    if not _matches(head, digest, uploaded=True):
        raise TransientError(
            f"{url} does not match {path} after the upload ({_describe(head, digest)});"
            " it will be uploaded again"
        )
    _log(context, "file_uploaded", url=url, bytes=digest.size, parts=len(digest.md5s),
         seconds=round(time.monotonic() - started, 3))  # fmt: skip
    return url


def object_key(prefix: str, relpath: str) -> str:
    """``prefix/relpath`` with ``//`` and ``.`` folded; PermanentError for any relpath that
    could leave the prefix (``..``, absolute) or mislead a reader (control characters,
    backslashes), and for keys that are not UTF-8 or longer than S3 allows."""
    for what, text in (("prefix", prefix), ("relative path", relpath)):
        problem = None
        if _CONTROL.search(text):
            problem = "contains control characters"
        elif "\\" in text:
            problem = "contains a backslash, which some tools read as a directory separator"
        elif what == "relative path" and text.startswith("/"):
            problem = "is absolute"
        elif ".." in text.split("/"):
            problem = "has a '..' component, so the object key would leave its prefix"
        if problem:
            raise PermanentError(f"refusing to upload: the {what} {text!r} {problem}")
    name = [p for p in relpath.split("/") if p not in ("", ".")]
    key = "/".join([p for p in prefix.split("/") if p not in ("", ".")] + name)
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise PermanentError(f"refusing to upload {relpath!r}: its name is not UTF-8") from None
    if not name or size > MAX_KEY_BYTES:
        raise PermanentError(f"refusing to upload {relpath!r}: no valid object key (1-1024 B)")
    return key


def parse_size(value: str | int) -> int:
    """Bytes from ``8388608``, ``"64MB"`` (10**6) or ``"8MiB"`` (2**20); ConfigError else."""
    number, unit = None, ""
    if isinstance(value, int) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip().lower())):
        number, unit = float(match[1]), match[2]
    if number is None or unit not in _UNITS or number * _UNITS[unit] < 1:
        raise ConfigError(f"not a size: {value!r} (use e.g. 64MB, 8MiB or a number of bytes)")
    return int(number * _UNITS[unit])


@dataclass(frozen=True)
class _Digest:
    """What the store must end up holding: size, SHA-256 and the MD5 of each part."""

    size: int
    sha256: str
    multipart: bool
    part_size: int
    md5s: tuple[bytes, ...]

    @classmethod
    def of(cls, path: str, threshold: int) -> _Digest:
        size = os.path.getsize(path)
        multipart = size >= threshold or size > MAX_SINGLE
        part_size = max(MIN_PART, min(threshold, MAX_PART), math.ceil(size / MAX_PARTS))
        part_size = part_size if multipart else max(size, 1)
        sha, md5s, total = hashlib.sha256(), list[bytes](), 0
        with open(path, "rb") as stream:
            while True:
                md5, n = hashlib.md5(usedforsecurity=False), 0
                while n < part_size and (block := stream.read(min(_BLOCK, part_size - n))):
                    md5.update(block)
                    sha.update(block)
                    n += len(block)
                if n == 0 and md5s:
                    break
                md5s.append(md5.digest())
                total += n
                if n < part_size:
                    break
        return cls(total, sha.hexdigest(), multipart, part_size, tuple(md5s))

    @property
    def etag(self) -> str:
        if not self.multipart:
            return self.md5s[0].hex()
        joined = hashlib.md5(b"".join(self.md5s), usedforsecurity=False).hexdigest()
        return f"{joined}-{len(self.md5s)}"


def _put_parts(fs: s3fs.S3FileSystem, bucket: str, key: str, path: str, digest: _Digest) -> None:
    upload = fs.call_s3(
        "create_multipart_upload", Bucket=bucket, Key=key, Metadata={"sha256": digest.sha256}
    )["UploadId"]
    try:
        parts = []
        with open(path, "rb") as stream:
            for number, md5 in enumerate(digest.md5s, start=1):
                out = fs.call_s3(
                    "upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                    Body=stream.read(digest.part_size), ContentMD5=_b64(md5),
                )  # fmt: skip
                parts.append({"PartNumber": number, "ETag": out["ETag"]})
        fs.call_s3(
            "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload,
            MultipartUpload={"Parts": parts},
        )  # fmt: skip
    except BaseException:
        # Parts of an abandoned upload are stored (and billed) until aborted. In an outage
        # the abort fails too; the first error is the one to report.
        with contextlib.suppress(Exception):
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
        raise


def _head(fs: s3fs.S3FileSystem, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        head: dict[str, Any] = fs.call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    return head


def _matches(head: dict[str, Any] | None, digest: _Digest, uploaded: bool = False) -> bool:
    """Whether the object is *digest*'s bytes. After our own upload all of size, metadata
    and an MD5-form ETag must agree; before it, the size and either of the others."""
    if head is None or head.get("ContentLength") != digest.size:
        return False
    same_sha = head.get("Metadata", {}).get("sha256") == digest.sha256
    etag = str(head.get("ETag", "")).strip('"')
    encrypted = head.get("ServerSideEncryption") == "aws:kms" or "SSECustomerAlgorithm" in head
    comparable = bool(_MD5_ETAG.fullmatch(etag)) and not encrypted
    if uploaded:
        return same_sha and (not comparable or etag == digest.etag)
    return same_sha or (comparable and etag == digest.etag)


def _describe(head: dict[str, Any] | None, digest: _Digest) -> str:
    if head is None:
        return "the object is missing"
    return (
        f"size {head.get('ContentLength')} vs {digest.size}, ETag {head.get('ETag')} vs"
        f" {digest.etag}, sha256 {head.get('Metadata', {}).get('sha256')} vs {digest.sha256}"
    )


def _b64(md5: bytes) -> str:
    return base64.b64encode(md5).decode("ascii")


def _stores(
    context: JobContext | SetupContext | None, objectstore: str
) -> Mapping[str, ObjectStoreConfig]:
    """The configured objectstores; called without a context (from plain Python), the
    credentials come from the AWS environment variables."""
    if context is None:
        from dpypeline.config.model import ObjectStoreConfig

        return {objectstore: ObjectStoreConfig()}
    return context.objectstores


def _log(context: JobContext | SetupContext | None, event: str, **fields: Any) -> None:
    if context is not None and context.log is not None:
        context.log.info(event, **fields)
