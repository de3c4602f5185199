"""``ObjectStoreS3``: the original's s3fs filesystem, built from its credentials JSON
(``{"token", "secret", "endpoint_url"}``), with its bucket helpers.

A pipeline config names its object stores under ``objectstores:`` and the built-in tasks
take that name; this class is for task code written against the original, and behaves
as it did. The credentials never reach a log line: only the JSON file's path is logged.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from typing import IO, Any

import fsspec
import s3fs

logger = logging.getLogger(__name__)

FileLike = str | os.PathLike[str] | IO[bytes]


class ObjectStoreS3(s3fs.S3FileSystem):
    def __init__(
        self,
        anon: bool = False,
        store_credentials_json: str | None = None,
        secret: str | None = None,
        key: str | None = None,
        endpoint_url: str | None = None,
        *fs_args: Any,
        **fs_kwargs: Any,
    ) -> None:
        self._anon = anon
        if store_credentials_json is None:
            logger.info("Object store credentials will be obtained from the arguments passed.")
            self._store_credentials = {"secret": secret, "token": key, "endpoint_url": endpoint_url}
        else:
            logger.info(
                f"Object store credentials will be read from the JSON file {store_credentials_json}"
            )
            self._store_credentials = self.load_store_credentials(store_credentials_json)
        self._remote_options = self.get_remote_options(override=True)
        super().__init__(*fs_args, **self._remote_options, **fs_kwargs)

    @staticmethod
    def load_store_credentials(path: str) -> dict[str, Any]:
        """The JSON file's keys; a missing ``token``, ``secret`` or ``endpoint_url`` is
        warned about (then its value is None)."""
        with open(path) as f:
            store_credentials: dict[str, Any] = json.load(f)
        for key in ("token", "secret", "endpoint_url"):
            if key not in store_credentials:
                logger.warning(
                    f'"{key}" is not a key in the JSON file provided.'
                    " Its value will be set to None."
                )
        return store_credentials

    def create_bucket(self, bucket: str, **kwargs: Any) -> None:
        """Creates the bucket; one that exists already is left as it is."""
        try:
            return self.mkdir(bucket, **kwargs)
        except FileExistsError:
            logger.info(f"Bucket '{bucket}' already exists.")
            return None

    def get_remote_options(self, override: bool = False) -> dict[str, Any]:
        """The s3fs options the store was made with (``override``: made again from the
        credentials)."""
        if override:
            creds = self._store_credentials
            self._remote_options = {
                "anon": self._anon,
                "secret": creds.get("secret"),
                "key": creds.get("token"),
                "client_kwargs": {"endpoint_url": creds.get("endpoint_url")},
            }
        return self._remote_options

    def get_mapper(
        self, bucket: str, prefix: str = "s3://", **get_mapper_kwargs: Any
    ) -> fsspec.mapping.FSMap:
        """A key-value view of ``prefix + bucket`` with the store's credentials."""
        return fsspec.get_mapper(prefix + bucket, **self._remote_options, **get_mapper_kwargs)

    def get_bucket_list(self) -> list[str]:
        return self.ls("/")

    def write_file_to_bucket(
        self,
        path: FileLike,
        bucket: str,
        file_name: str,
        chunk_size: int = -1,
        parallel: bool = False,
    ) -> None:
        """Upload a file (or a binary file object) to ``bucket/file_name``, in parts of
        ``chunk_size`` bytes merged at the end (-1: one part); ``parallel`` uploads the
        parts with Dask. A file of one part is written to ``file_name`` itself (the
        original wrote it to ``file_name.part0`` and left ``file_name`` empty)."""
        assert bucket.split(os.path.sep, 1)[0] in self.get_bucket_list(), (
            f'Bucket "{bucket}" does not exist.'
        )
        if isinstance(path, str | os.PathLike):
            assert os.path.isfile(path), f'"{path!s}" is not a file.'
            file_size = os.path.getsize(path)
        elif isinstance(path, io.IOBase):
            file_size = path.seek(0, os.SEEK_END)
        else:
            raise ValueError(f'"{path}" is not file-like, path-like or a string.')
        dest_path = os.path.join(bucket, file_name)
        self.open(dest_path, mode="wb", s3={"profile": "default"}).close()
        chunks = self._create_chunks_offsets_lengths(file_size, chunk_size)
        self._write_to_bucket(path, dest_path, chunks, parallel)

    def _write_to_bucket(
        self,
        path: FileLike,
        dest_path: str,
        chunks_offsets_lengths: dict[int, dict[str, int]],
        parallel: bool,
    ) -> None:
        if len(chunks_offsets_lengths) == 1:  # the original wrote it to .part0, leaving dest empty
            parts = [dest_path]
        else:
            parts = [f"{dest_path}.part{i}" for i in range(len(chunks_offsets_lengths))]
        offsets = [c["offset"] for c in chunks_offsets_lengths.values()]
        lengths = [c["length"] for c in chunks_offsets_lengths.values()]
        paths = [path] * len(parts)
        if parallel:
            import dask

            dask.compute(list(map(dask.delayed(self._write_chunk), paths, parts, offsets, lengths)))
        else:
            list(map(self._write_chunk, paths, parts, offsets, lengths))
        if len(parts) > 1:
            self.merge(dest_path, parts)
            self.rm(parts)

    def _write_chunk(
        self, path_read: FileLike, path_write: str, chunk_offset: int, chunk_length: int
    ) -> None:
        with _open(path_read) as f:
            f.seek(chunk_offset, 0)
            bytechunk = f.read(chunk_length)
        with self.open(path_write, mode="wb", s3={"profile": "default"}) as f:
            f.write(bytechunk)

    def _create_chunks_offsets_lengths(
        self, nbytes: int, chunk_size: int
    ) -> dict[int, dict[str, int]]:
        if chunk_size == -1:
            chunk_size = nbytes
        return {
            i: {"offset": i * chunk_size, "length": chunk_size}
            for i in range(math.ceil(nbytes / chunk_size))
        }


def _open(path: FileLike) -> IO[bytes]:
    if isinstance(path, str | os.PathLike):
        return open(path, "rb")
    if isinstance(path, io.IOBase):
        return path
    raise ValueError(f"Unsupported file type: {type(path)}")


__all__ = ["ObjectStoreS3"]
