"""What a file must share with a virtual repository before its references go in.

A reference points at the bytes a file stores; how those bytes decode (dtype, codecs,
chunk shape, ``scale_factor``, ``add_offset``, ``_FillValue``, ``missing_value``) is
written once, on the repository's array, for every file's chunks alike. A file whose
bytes decode differently would read silently wrong through the first file's encoding,
so it is refused, and the message names the variable and the attribute. So is a file
whose variables, dimensions or grid (the values of the variables without the append
dimension, compared as stored bytes) differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dpypeline.errors import PermanentError

if TYPE_CHECKING:
    import xarray as xr
    import zarr

# Attributes that say how a reference's bytes decode: one value per repository array.
DECODING_ATTRS = ("scale_factor", "add_offset", "_FillValue", "missing_value")
GRID_ATTR = "dpypeline_grid_sha256"
ADVICE = (
    "a reference cannot carry a per-file encoding: write these files with to_zarr (which"
    " decodes each file), or start a new repository for them"
)


def mapping(value: Any) -> dict[str, Any]:
    """An attribute that should hold a mapping (JSON read back), as a dict."""
    return dict(value) if isinstance(value, Mapping) else {}


def grid_digests(raw: Mapping[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(raw.items())}


def fixed_variables(vds: xr.Dataset, dim: str) -> list[str]:
    """The variables without ``dim`` (the grid: nav_lat, deptht, …)."""
    return sorted(str(n) for n, v in vds.variables.items() if dim not in v.dims)


def check(
    vds: xr.Dataset, group: zarr.Group, dim: str, where: str, grid: Mapping[str, str]
) -> None:
    """Refuse (PermanentError) a file whose references would not read as it decodes."""
    stored = {name: array for name, array in group.arrays()}
    names, have = set(map(str, vds.variables)), set(stored)
    if names != have:
        missing, extra = sorted(have - names), sorted(names - have)
        raise PermanentError(
            f"{where} does not have the repository's variables (missing: {missing or 'none'};"
            f" not in the repository: {extra or 'none'}): a virtual store holds files of one"
            " layout; start a new repository for these files"
        )
    for name in sorted(names):
        _check_variable(name, vds.variables[name], stored[name], dim, where)
    known = mapping(group.attrs.get(GRID_ATTR))
    for name, digest in grid.items():
        if name in known and known[name] != digest:
            raise PermanentError(
                f"{where}: the values of {name!r} differ from the repository's (another grid"
                f" or configuration): its steps cannot share the repository's {name!r}; start"
                " a new repository for these files"
            )


def _check_variable(name: str, var: Any, array: zarr.Array, dim: str, where: str) -> None:
    from virtualizarr.manifests import ManifestArray

    dims = tuple(map(str, var.dims))
    stored_dims = tuple(getattr(array.metadata, "dimension_names", None) or ())
    if dims != stored_dims:
        raise PermanentError(
            f"{where}: variable {name!r} has dimensions {dims} where the repository has"
            f" {stored_dims}; start a new repository for these files"
        )
    for axis, d in enumerate(dims):
        if d != dim and var.shape[axis] != array.shape[axis]:
            raise PermanentError(
                f"{where}: variable {name!r} has {var.shape[axis]} along {d!r} where the"
                f" repository has {array.shape[axis]} (another grid); start a new repository"
                " for these files"
            )
    if not isinstance(var.data, ManifestArray):
        return  # stored natively: xarray encodes it as the repository's array does
    _check_encoding(name, var.data, var.attrs, array, where)


def _check_encoding(
    name: str, ma: Any, attrs: Mapping[str, Any], array: zarr.Array, where: str
) -> None:
    from virtualizarr.codecs import get_codecs
    from xarray.backends.zarr import encode_zarr_attr_value

    if ma.dtype != array.dtype:
        _refuse(where, name, "dtype", ma.dtype, array.dtype)
    if tuple(ma.chunks) != tuple(array.chunks):
        _refuse(where, name, "chunk shape", tuple(ma.chunks), tuple(array.chunks))
    codecs, stored_codecs = get_codecs(ma), get_codecs(array)
    if codecs != stored_codecs:
        _refuse(where, name, "codecs", _names(codecs), _names(stored_codecs))
    for attr in DECODING_ATTRS:
        new = encode_zarr_attr_value(attrs[attr]) if attr in attrs else None
        old = array.attrs.get(attr)
        if new != old:
            _refuse(where, name, attr, _shown(new, ma.dtype), _shown(old, ma.dtype))


def _refuse(where: str, name: str, attr: str, new: Any, old: Any) -> None:
    raise PermanentError(
        f"{where}: variable {name!r} has {attr} {new!r} where the repository has {old!r}: {ADVICE}"
    )


def _names(codecs: Any) -> list[str]:
    return [
        type(c).__name__ + (f"({c.codec_config})" if hasattr(c, "codec_config") else "")
        for c in codecs
    ]


def _shown(value: Any, dtype: Any) -> Any:
    """Zarr keeps a ``_FillValue`` as base64 of its bytes; show the number."""
    import base64
    import binascii

    import numpy as np

    if isinstance(value, str):
        try:
            return np.frombuffer(base64.b64decode(value, validate=True), dtype=dtype)[0].item()
        except (binascii.Error, ValueError, IndexError):
            return value
    return value
