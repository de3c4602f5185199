"""How a new Zarr store lays out its arrays: the chunk shape of each array and its codec.

The store chooses its chunks; they are never copied from the source file. A NetCDF file's
HDF5 chunks are sized for a local disk and for NEMO's own writer (``namnc4``: 3-D chunks of
(1, 3, 302, 361), 1.3 MB at ORCA025), or hold a whole 4 GB field: as objects in S3 the
first are far too many round trips, the second cannot even be compressed (Blosc refuses
buffers over 2 GiB) and must sit whole in memory to be written.

The policy (:func:`store_chunks`), for an array created by ``to_zarr``:

- along the append (or region) dimension: one step, unless ``chunks:`` says otherwise;
- every other dimension starts whole and the largest one is halved until a chunk holds at
  most :data:`TARGET_CHUNK_BYTES` uncompressed; a halving is rounded up to a multiple of
  the source's chunk along that dimension where that still splits it, so every source
  chunk goes to exactly one store chunk and is freed as soon as that chunk is written;
- ``chunks: {dim: N}`` fixes a dimension to N points, ``-1`` to the whole dimension;
- no chunk may exceed :data:`MAX_CHUNK_BYTES`, the codecs' limit.

:data:`TARGET_CHUNK_BYTES` is 64 MiB. The guidance for Zarr on object stores (Zarr's and
Pangeo's, Dask's array best practices) is chunks of roughly 10 to 100 MB uncompressed: an
S3 request costs tens of milliseconds whatever its size, so much smaller chunks make
reading a field a matter of request latency, while much larger ones make readers fetch and
decompress data they did not ask for and make every writer thread hold that much memory
(twice, compressed and not). Halving from whole dimensions lands between 32 and 64 MiB.

Codecs (:class:`Compressor`): ``to_zarr: {compressor: ...}`` in the YAML; the default,
Blosc with Zstandard at level 3 and byte shuffle, was chosen by measuring NEMO fields (the
README's Performance section has the table).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dpypeline.errors import ConfigError

TARGET_CHUNK_BYTES = 64 * 2**20
MAX_CHUNK_BYTES = 2**31 - 1 - 16  # Blosc's largest buffer, the tightest of the codecs
WHOLE = -1  # ``chunks: {dim: -1}``: the whole dimension, as in xarray and dask

CODECS = ("blosc-zstd", "blosc-lz4", "blosc-zlib", "zstd", "zlib", "none")
SHUFFLES = ("byte", "bit", "none")


@dataclass(frozen=True)
class Compressor:
    """A codec for new arrays: ``codec`` one of :data:`CODECS`, its ``level`` (None: the
    codec's own default) and, for the Blosc codecs, ``shuffle`` of bytes or bits."""

    codec: str = "blosc-zstd"
    level: int | None = 3
    shuffle: str = "byte"

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | None) -> Compressor:
        """From the YAML: a codec name (``zstd``), a mapping (``{codec: blosc-lz4, level:
        5, shuffle: bit}``), or None for the default."""
        if spec is None:
            return cls()
        if isinstance(spec, str):
            spec = {"codec": spec}
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"to_zarr: compressor must be a codec name or a mapping, not {spec!r}"
            )
        if unknown := sorted(set(spec) - {"codec", "level", "shuffle"}):
            raise ConfigError(
                f"to_zarr: compressor: unknown keys {', '.join(unknown)} (codec, level, shuffle)"
            )
        codec = str(spec.get("codec", cls.codec)).lower()
        if codec not in CODECS:
            raise ConfigError(
                f"to_zarr: compressor: codec must be one of {', '.join(CODECS)}, not {codec!r}"
            )
        level = spec.get("level", cls.level if codec == cls.codec else None)
        if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
            raise ConfigError(f"to_zarr: compressor: level must be a whole number, not {level!r}")
        shuffle = str(spec.get("shuffle", "byte" if codec.startswith("blosc") else "none"))
        if shuffle not in SHUFFLES:
            raise ConfigError(
                f"to_zarr: compressor: shuffle must be one of {', '.join(SHUFFLES)},"
                f" not {shuffle!r}"
            )
        if shuffle != "none" and not codec.startswith("blosc"):
            raise ConfigError(
                f"to_zarr: compressor: shuffle works with the blosc codecs only, not {codec!r}"
            )
        return cls(codec, level, shuffle)

    def __str__(self) -> str:
        level = "" if self.level is None else f" level {self.level}"
        shuffle = f", {self.shuffle} shuffle" if self.shuffle != "none" else ""
        return f"{self.codec}{level}{shuffle}"

    def encoding(self, zarr_format: int, itemsize: int) -> dict[str, Any]:
        """The ``compressors`` entry of an xarray Zarr encoding, for either format."""
        if self.codec == "none":
            return {"compressors": None}
        if zarr_format == 2:
            return {"compressors": (self._numcodec(itemsize),)}
        return {"compressors": (self._zarr3_codec(itemsize),)}

    def _numcodec(self, itemsize: int) -> Any:
        import numcodecs

        if self.codec.startswith("blosc"):
            shuffle = {"byte": numcodecs.Blosc.SHUFFLE, "bit": numcodecs.Blosc.BITSHUFFLE}
            return numcodecs.Blosc(
                cname=self.codec.removeprefix("blosc-"),
                clevel=5 if self.level is None else self.level,
                shuffle=shuffle.get(self.shuffle, numcodecs.Blosc.NOSHUFFLE),
            )
        if self.codec == "zstd":
            return numcodecs.Zstd(level=3 if self.level is None else self.level)
        return numcodecs.Zlib(level=1 if self.level is None else self.level)

    def _zarr3_codec(self, itemsize: int) -> Any:
        from zarr.codecs import BloscCname, BloscCodec, BloscShuffle, GzipCodec, ZstdCodec

        if self.codec.startswith("blosc"):
            shuffles = {"byte": BloscShuffle.shuffle, "bit": BloscShuffle.bitshuffle}
            return BloscCodec(
                cname=BloscCname(self.codec.removeprefix("blosc-")),
                clevel=5 if self.level is None else self.level,
                shuffle=shuffles.get(self.shuffle, BloscShuffle.noshuffle),
                typesize=itemsize,
            )
        if self.codec == "zstd":
            return ZstdCodec(level=3 if self.level is None else self.level)
        return GzipCodec(level=1 if self.level is None else self.level)


def store_chunks(
    name: str,
    dims: Sequence[str],
    shape: Sequence[int],
    itemsize: int,
    *,
    along: str | None,
    overrides: Mapping[str, int],
    source: Mapping[str, int] | None = None,
    target: int | None = None,
) -> tuple[int, ...]:
    """The chunk shape of a new array ``name`` (see the module doc for the policy).

    ``along``: the append or region dimension (one step per chunk unless overridden);
    ``overrides``: ``to_zarr``'s ``chunks:``, by dimension; ``source``: the source's chunk
    size by dimension (the dask chunks as read), to split along its boundaries.
    """
    source = source or {}
    target = TARGET_CHUNK_BYTES if target is None else target
    sizes: list[int] = []
    free: list[int] = []
    for i, (dim, n) in enumerate(zip(dims, shape, strict=True)):
        fixed = overrides.get(dim)
        if fixed is None:
            sizes.append(1 if dim == along else max(n, 1))
            if dim != along:
                free.append(i)
        elif fixed == WHOLE:
            sizes.append(max(n, 1))
        elif isinstance(fixed, int) and not isinstance(fixed, bool) and fixed >= 1:
            sizes.append(fixed if dim == along else min(fixed, max(n, 1)))
        else:
            raise ConfigError(
                f"to_zarr: chunks: {dim}: {fixed!r} is not a chunk size: give a number of"
                " points, or -1 for the whole dimension"
            )

    def nbytes() -> int:
        return math.prod(sizes) * itemsize

    while nbytes() > target and (splittable := [i for i in free if sizes[i] > 1]):
        i = max(splittable, key=lambda i: sizes[i])
        sizes[i] = _half(sizes[i], source.get(dims[i]))
    if nbytes() > MAX_CHUNK_BYTES:
        shape_text = dict(zip(dims, sizes, strict=True))
        raise ConfigError(
            f"to_zarr: a chunk of {name} would hold {nbytes() / 2**30:.1f} GiB ({shape_text});"
            " the codecs take at most 2 GiB per chunk: give smaller sizes in to_zarr's"
            f" `chunks:` for {', '.join(d for d in dims if d in overrides)}"
        )
    return tuple(sizes)


def _half(size: int, source: int | None) -> int:
    """About half of ``size``: a multiple of ``source`` if that still splits it."""
    half = -(-size // 2)
    if source and 1 <= source < size:
        aligned = -(-half // source) * source
        if aligned < size:
            return aligned
    return half


def source_chunks(var: Any) -> dict[str, int]:
    """A variable's chunk size by dimension as its data will be read: the dask chunks, or
    for a lazily read variable the file's own (``preferred_chunks``, ``chunksizes``)."""
    if var.chunks is not None:
        return {str(d): int(c[0]) for d, c in zip(var.dims, var.chunks, strict=True) if c}
    preferred = var.encoding.get("preferred_chunks")
    if preferred:
        return {str(d): int(n) for d, n in preferred.items()}
    sizes = var.encoding.get("chunksizes")
    if sizes and len(sizes) == len(var.dims):
        return {str(d): int(n) for d, n in zip(var.dims, sizes, strict=True)}
    return {}
