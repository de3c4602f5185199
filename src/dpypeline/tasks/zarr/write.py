"""One file's write into one store, under the store's lock: check the file against the
store, place its steps, check that it fills whole chunks, write, commit; or, for steps
already there, apply the ``overlap`` policy. Every refusal is a PermanentError whose
message says what differs and what to do (:func:`dpypeline.tasks.zarr.to_zarr.to_zarr`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dpypeline.errors import PermanentError
from dpypeline.tasks.zarr import encoding as ze
from dpypeline.tasks.zarr import history as zh
from dpypeline.tasks.zarr import store as zs
from dpypeline.tasks.zarr.store import StoreState, failpoint

if TYPE_CHECKING:
    import xarray as xr

Overlap = Literal["replace", "skip", "forbid"]


@dataclass
class Write:
    """One file's write into one store, under the store's lock."""

    ds: xr.Dataset
    dim: str
    url: str
    overlap: Overlap
    consolidated: bool
    job_id: int | None = None  # recorded with the steps it appends (``history``)
    state: StoreState = field(init=False)
    stored: xr.Dataset = field(init=False)  # the store as xarray decodes it, lazily

    def append(
        self, zstore: Any, state: StoreState | None, zarr_format: int, layout: ze.Layout
    ) -> dict[str, Any]:
        ds, dim, n = self.ds, self.dim, self.ds.sizes[self.dim]
        info: dict[str, Any] = {"steps": [0, n], **_span(ds, dim)}
        if state is None or (zs.APPEND_DIM in state.attrs and zs.COMMITTED not in state.attrs):
            attrs = {zs.APPEND_DIM: dim}
            ze.write_new(ds, zstore, state, zarr_format, layout=layout, attrs=attrs)
            created = zs.open_store(zstore, self.url)
            assert created is not None
            record = zh.recorded({}, self.job_id, 0, n)
            zs.commit(created, {zs.COMMITTED: n} | record, self.consolidated)
            return {"event": "zarr_appended", "created": True} | info
        if state.attrs.get(zs.APPEND_DIM, dim) != dim:
            raise PermanentError(
                f"{self.url} is appended along {state.attrs[zs.APPEND_DIM]!r}, not {dim!r}:"
                " fix append_dim"
            )
        committed = zs.committed_length(state, dim)
        if repaired := zs.repair(state, dim, committed):
            info["repaired"] = repaired
        self.check(state)
        start = self.place_append(committed)
        info["steps"] = [start, start + n]
        if start < committed:
            self.check_alignment(start, committed)
            return self.replay(start, write_index=True) | info
        self.check_alignment(start, start + n)
        zs.grow(state, dim, start + n)
        self.write_arrays(start, write_index=True)
        record = zh.recorded(state.attrs, self.job_id, start, start + n)
        markers = {zs.APPEND_DIM: dim, zs.COMMITTED: start + n} | record
        zs.commit(state, markers, self.consolidated)
        return {"event": "zarr_appended"} | info

    def region(self, state: StoreState | None) -> dict[str, Any]:
        if state is None or self.dim not in state.arrays:
            raise PermanentError(
                f"{self.url} is not a template with a {self.dim} coordinate: create it first"
                " (dpypeline.tasks.zarr.to_zarr.create_template), or use append_dim"
            )
        written = [(int(a), int(b)) for a, b in state.attrs.get(zs.WRITTEN, [])]
        if zs.COMMITTED in state.attrs:  # an append store, used as a template
            zs.repair(state, self.dim, int(state.attrs[zs.COMMITTED]))
            written.append((0, int(state.attrs[zs.COMMITTED])))
        self.check(state)
        length = state.length(self.dim, self.dim)
        start, stop = self.locate(length, template=True)
        self.check_alignment(start, length)
        info = {"steps": [start, stop], **_span(self.ds, self.dim)}
        covered = sum(max(0, min(stop, b) - max(start, a)) for a, b in _merge(written))
        if covered == stop - start:
            return self.replay(start, write_index=False) | info
        if covered:
            raise PermanentError(
                f"{_steps(self.ds, self.dim)} of the file overlap steps already written to"
                f" {self.url} only in part: a file must cover whole steps written before, or none"
            )
        self.write_arrays(start, write_index=False)
        regions = [list(r) for r in _merge([*written, (start, stop)])]
        zs.commit(state, {zs.WRITTEN: regions}, self.consolidated)
        return {"event": "zarr_region_written"} | info

    def replay(self, start: int, *, write_index: bool) -> dict[str, Any]:
        """The file's steps are already in the store: apply the overlap policy."""
        n = self.ds.sizes[self.dim]
        what = f"{_steps(self.ds, self.dim)} of the file are already in {self.url}"
        what += f" (steps {start}..{start + n - 1})"
        if self.overlap == "forbid":
            raise PermanentError(
                f"{what}; overlap=forbid refuses to write them again. If the file was"
                " corrected, set overlap: replace"
            )
        if self.overlap == "skip":
            if differ := [n for n in _along(self.ds, self.dim) if not self.same(n, start)]:
                raise PermanentError(
                    f"{what} with different values of {', '.join(differ)}; overlap=skip keeps"
                    " the store as it is. To overwrite them, set overlap: replace"
                )
            action = "skipped_identical"
        else:
            self.write_arrays(start, write_index=write_index)
            action = "replaced"
        zs.save_group(self.state, {}, self.consolidated)  # if the last attempt died before it
        return {"event": "zarr_replayed", "action": action}

    def write_arrays(self, start: int, *, write_index: bool) -> None:
        """The data variables first (in one computation), then the other variables along
        the dimension, then (in append mode) its coordinate: a reader that finds the
        coordinate finds the data."""
        names = [n for n in _along(self.ds, self.dim) if n != self.dim]
        data = [n for n in names if n in self.ds.data_vars]
        groups = [data, [n for n in names if n not in data]]
        for i, group in enumerate(groups):
            if i == 1 and data:
                failpoint("between_arrays")
            self._write(group, start)
        failpoint("before_coordinate")
        if write_index:
            self._write([self.dim], start)

    def _write(self, names: list[str], start: int) -> None:
        variables = [(n, self.ds[n].variable, self.stored[n].variable) for n in names]
        ze.write_arrays(variables, self.state, dim=self.dim, start=start)

    def same(self, name: str, start: int | None = None) -> bool:
        var, stored = self.ds[name].variable, self.stored[name].variable
        dim = self.dim if start is not None else None
        return ze.same(var, stored, self.state, name, dim=dim, start=start or 0)

    def check(self, state: StoreState) -> None:
        """Open the store as xarray decodes it and check that the file matches it."""
        self.state, self.stored = state, ze.open_lazy(state)
        ds, stored, dim = self.ds, self.stored, self.dim
        mine, theirs = set(map(str, ds.variables)), set(map(str, stored.variables))
        problems = []
        if extra := sorted(mine - theirs):
            problems.append(f"variables not in the store: {', '.join(extra)}")
        if missing := sorted(theirs - mine):
            problems.append(f"variables missing from the file: {', '.join(missing)}")
        for name in sorted(mine & theirs):
            a, b = ds[name].variable, stored[name].variable
            if a.dims != b.dims:
                problems.append(f"{name} has dimensions {a.dims}, the store's {b.dims}")
            elif _dtype(a) != _dtype(b):
                problems.append(f"{name} is {_dtype(a)}, the store's is {_dtype(b)}")
        for d, size in ds.sizes.items():
            if d != dim and d in stored.sizes and size != stored.sizes[d]:
                problems.append(f"dimension {d} has {size} points, the store's {stored.sizes[d]}")
        fixed = [n for n in sorted(mine & theirs) if dim not in ds[n].dims]
        if not problems and (differ := [n for n in fixed if not self.same(n)]):
            problems.append(f"values of {', '.join(differ)} differ from the store's")
        if problems:
            raise PermanentError(
                f"the file does not match {self.url}: {'; '.join(problems)}. Every file written"
                " to one store must have the same variables, dimensions and dtypes, and the"
                f" same values of the variables without {dim} (nav_lat, nav_lon, depth …):"
                " write this file to another store, or fix it with a task before to_zarr"
            )

    def place_append(self, committed: int) -> int:
        """Where the file's steps go: at ``committed`` if they all come after the last step
        (one value read), else where they already are (a replay)."""
        if committed == 0:
            return 0
        first = ze.raw(self.ds[self.dim].variable, self.stored[self.dim].variable)[0]
        if first > np.asarray(self.state.arrays[self.dim][committed - 1]):
            return committed
        return self.locate(committed, template=False)[0]

    def locate(self, length: int, *, template: bool) -> tuple[int, int]:
        """The slice of the store's first ``length`` steps whose coordinate values are
        exactly the file's, in order."""
        ds, dim, url = self.ds, self.dim, self.url
        new = ze.raw(ds[dim].variable, self.stored[dim].variable)
        if np.any(np.diff(new) <= 0):
            raise PermanentError(f"the file's {dim} values are not increasing: fix the file")
        old = np.asarray(self.state.arrays[dim][:length])
        index = {v: i for i, v in enumerate(old.tolist())}
        found = [index.get(v) for v in new.tolist()]
        if found[0] is not None and found == list(range(found[0], found[0] + len(found))):
            return found[0], found[0] + len(found)
        if any(i is not None for i in found):
            raise PermanentError(
                f"{_steps(ds, dim)} of the file overlap the steps of {url} only in part: a"
                " file must cover whole steps already written, or none"
            )
        first, last = ze.decode_values(old[[0, -1]], self.stored[dim].variable)
        if template:
            raise PermanentError(
                f"{_steps(ds, dim)} of the file are not in the template {url} ({dim} from"
                f" {first} to {last}): extend the template, or check the file's {dim}"
            )
        raise PermanentError(
            f"{_steps(ds, dim)} of the file come before the last step of {url} ({last}) but"
            " are not in it: append mode only adds steps after the last one. To write files"
            f" in any order or fill gaps, create a template store with the whole {dim} axis"
            f" (create_template) and write with region: {dim}"
        )

    def check_alignment(self, start: int, length: int) -> None:
        stop = start + self.ds.sizes[self.dim]
        if bad := zs.misaligned(self.state, self.dim, start, stop, length):
            sizes = ", ".join(f"{n}: {c}" for n, c in bad.items())
            raise PermanentError(
                f"writing steps {start}..{stop - 1} along {self.dim} of {self.url} would rewrite"
                f" part of a chunk that also holds other steps (steps per chunk: {sizes}), which"
                " a crash could leave half written. Each write must fill whole chunks: write"
                " files whose number of steps is a multiple of the chunk, or create the store"
                f" with chunks of 1 step (to_zarr `chunks: {{{self.dim}: 1}}`)"
            )


def _dtype(var: xr.Variable) -> str:
    """The dtype, with every kind of decoded time (datetime64 or cftime) as "datetime"."""
    if var.dtype.kind == "M" or " since " in str(var.encoding.get("units")):
        return "datetime"
    if var.dtype.kind == "O" and var.size:
        import cftime

        if isinstance(var[(0,) * var.ndim].values[()], cftime.datetime):
            return "datetime"
    return str(var.dtype)


def _along(ds: xr.Dataset, dim: str) -> list[str]:
    return [str(n) for n, v in ds.variables.items() if dim in v.dims]


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def _span(ds: xr.Dataset, dim: str) -> dict[str, str]:
    values = ds[dim].values
    return {"first": str(values[0]), "last": str(values[-1])}


def _steps(ds: xr.Dataset, dim: str) -> str:
    span = _span(ds, dim)
    if span["first"] == span["last"]:
        return f"the step {dim}={span['first']}"
    return f"the steps {dim}={span['first']} to {span['last']}"
