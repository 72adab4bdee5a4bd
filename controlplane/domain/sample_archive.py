"""Reading pushed sample data without trusting it: an `.npz` (a zip of `.npy`
members, as np.savez / np.savez_compressed write it) or a plain `.npy`.

np.load trusts a file's headers: it allocates whatever shape a member
declares and inflates whatever a member holds, so a 3 MB archive declaring
GiBs grew the control plane by 3.2 GB. Here every header is read first
(numpy's own `numpy.lib.format` readers, over a bounded prefix of each
member) and checked against the limits below before any array data is
decompressed; the data is then read in bounded chunks, up to exactly the
size the header declares, with zipfile checking each member's CRC at its
end. A build reads only the rows it uses (`load(path, rows=N)`), keeping
those rows' bytes as the data streams past. Every malformed input is an
InvalidArgument saying what is wrong.

Pure functions over files: no gRPC, no SQL."""

from __future__ import annotations

import io
import math
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
from numpy.lib import format as npy_format

from edgefleet.controlplane.errors import InvalidArgument

MiB = 1024 * 1024

# Largest array one sample file may hold, decompressed (its header's shape x
# itemsize). 256 MiB is ~330 ImageNet-sized float32 samples: plenty to
# calibrate and judge a build, small enough for a build worker to hold.
MAX_SAMPLE_ARRAY_BYTES = 256 * MiB
# Largest total of all arrays in one sample file, decompressed: what a build
# worker holds in memory for the file.
MAX_SAMPLE_TOTAL_BYTES = 512 * MiB
# Most arrays (zip members) one .npz may hold: one per model input plus
# `labels`.
MAX_SAMPLE_ARRAYS = 64
# Largest zip central directory accepted. zipfile builds a ZipInfo (~0.5 KB)
# for every directory entry before anything can count them, so a directory of
# millions of empty members would cost GBs; 64 members need a few KB.
MAX_ZIP_DIRECTORY_BYTES = 64 * 1024
# Most dimensions an array may declare (numpy 1.x's own limit).
MAX_SAMPLE_ARRAY_DIMS = 32
# Longest .npy header read (numpy's own default for `max_header_size`).
MAX_NPY_HEADER_CHARS = 10_000
# Data is decompressed and copied in chunks of this size, never whole.
READ_CHUNK_BYTES = MiB

# Array kinds accepted: bool, signed and unsigned integers, floats, complex.
# Object arrays need pickle; structured, void, string and datetime arrays are
# no model input's type.
ACCEPTED_DTYPE_KINDS = "biufc"
# Members are stored or deflated, as np.savez / np.savez_compressed write
# them. zipfile inflates a bzip2 or LZMA member a whole compressed block at a
# time, so one small block could still expand to GBs before a cap is checked.
ACCEPTED_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# The key a plain .npy's single array is returned under; an .npz member
# cannot have an empty array name (that is refused).
SINGLE_ARRAY = ""

_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")
# End of central directory record (PKWARE APPNOTE 4.3.16): signature, disk
# numbers, entry counts, directory size and offset, comment length.
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIGNATURE = b"PK\x05\x06"
_MAX_ZIP_COMMENT = 0xFFFF
_NPY_PREFIX_BYTES = npy_format.MAGIC_LEN + 4 + MAX_NPY_HEADER_CHARS
_ENCRYPTED_FLAG = 0x1

T = TypeVar("T")


@dataclass(frozen=True)
class ArrayHeader:
    """What one array's .npy header declares, checked against the limits."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    nbytes: int
    # Bytes of the .npy header (magic included) before the array data.
    header_bytes: int


@dataclass(frozen=True)
class _Member:
    """Where one array lives: a zip member's info, or None for a plain .npy."""

    info: zipfile.ZipInfo | None
    header: ArrayHeader


def read_headers(path: Path) -> dict[str, ArrayHeader]:
    """Every array's header, checked against the limits, reading no array
    data. A plain .npy's array is under SINGLE_ARRAY. Does not prove the data
    is intact: `verify` does."""
    return {name: m.header for name, m in _members(path).items()}


def verify(
    path: Path,
    *,
    single_name: str = SINGLE_ARRAY,
    ranges: dict[str, tuple[int, int]] | None = None,
) -> dict[str, ArrayHeader]:
    """read_headers, then stream every array's data through (bounded memory,
    nothing kept) so that a truncated or corrupted member, or a float array
    holding NaN or infinite values, is refused now, not when a build loads
    it: a build compares candidates with the original on the samples, and
    NaN in, NaN out compares as nothing (every metric then read perfect).
    `single_name`: what an error calls a plain .npy's array (the input it
    feeds). `ranges`: filled with (min, max) of each integer array whose
    name it holds as a key (labels, checked against the classes)."""
    members = _members(path)
    non_finite: dict[str, int] = {}
    # Bytes of an element cut by a chunk's end, until the next chunk.
    pending: dict[str, bytes] = {}

    def check(name: str, chunk: bytes) -> None:
        dtype = members[name].header.dtype
        ranged = ranges is not None and name in ranges and dtype.kind in "iu"
        if not ranged and dtype.kind not in "fc":
            return
        data = pending.pop(name, b"") + chunk if name in pending else chunk
        whole = len(data) // dtype.itemsize * dtype.itemsize
        if whole < len(data):
            pending[name] = data[whole:]
        values = np.frombuffer(data, dtype, whole // dtype.itemsize)
        if ranged and ranges is not None:
            if values.size:
                low, high = ranges[name]
                ranges[name] = (min(low, int(values.min())), max(high, int(values.max())))
            return
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        if bad:
            non_finite[name] = non_finite.get(name, 0) + bad

    _read_data(path, members, check)
    if non_finite:
        name, count = next(iter(non_finite.items()))
        label = f"array {single_name!r} (.npy)" if name == SINGLE_ARRAY else f"array {name!r}"
        raise InvalidArgument(
            f"sample data {label} holds {count:,} NaN or infinite values; every sample "
            "value must be finite (builds compare each candidate with the original model "
            "on the samples, and NaN compares as nothing)"
        )
    return {name: m.header for name, m in members.items()}


def load(
    path: Path, *, rows: int | None = None, whole: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """Every array, in native byte order. Headers are checked against the
    limits before anything is allocated; a plain .npy's array is under
    SINGLE_ARRAY.

    With `rows`, an array with more than `rows` entries along its first (the
    sample) axis is read as only `picked_rows(count, rows)` of them: the
    data streams past in READ_CHUNK_BYTES chunks and only the picked rows'
    bytes are kept, so memory is those rows, not the array. Reading stops
    after the last picked row, so the CRC of a member read in part is not
    checked (the push verified it; `verify` checks a whole file). Arrays
    named in `whole` (a model input's one constant value, whose axis 0 is
    not samples) are read whole."""
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be at least 1, not {rows}")
    members = _members(path)
    readers = {
        name: _RowReader(m.header, None if name in whole else rows) for name, m in members.items()
    }
    _read_data(
        path,
        members,
        lambda name, chunk: readers[name].take(chunk),
        {name: r.end for name, r in readers.items()},
    )
    return {name: readers.pop(name).array() for name in members}


def picked_rows(count: int, rows: int) -> np.ndarray:
    """Which of `count` samples a reader keeping at most `rows` of them
    takes: all when they fit, otherwise `rows` evenly spaced ones, the first
    included (row k * count // rows for k < rows). Evenly spaced rather than
    the first few, so that samples pushed sorted (by class, by time) are
    still represented. Deterministic: every build of the same file uses the
    same rows."""
    if count <= rows:
        return np.arange(count, dtype=np.int64)
    return np.arange(rows, dtype=np.int64) * count // rows


def by_input_name(arrays: Mapping[str, T], input_names: Sequence[str]) -> dict[str, T]:
    """Arrays keyed by model input: an .npz's as they are; a plain .npy's
    single array as the samples of the model's only input."""
    if set(arrays) != {SINGLE_ARRAY}:
        return dict(arrays)
    if len(input_names) != 1:
        raise InvalidArgument(
            f"sample data is a plain .npy (one array) but the model has {len(input_names)} "
            f"inputs {sorted(input_names)}; push an .npz with one array named after each input"
        )
    return {input_names[0]: arrays[SINGLE_ARRAY]}


# ---------------------------------------------------------------- internals


def _members(path: Path) -> dict[str, _Member]:
    with path.open("rb") as f:
        start = f.read(len(npy_format.MAGIC_PREFIX))
    if start == npy_format.MAGIC_PREFIX:
        return {SINGLE_ARRAY: _npy_member(path)}
    if start[:4] in _ZIP_SIGNATURES:
        return _npz_members(path)
    raise InvalidArgument(
        "sample data is not a readable .npz or .npy file: it starts with neither the zip "
        "nor the .npy signature (write it with np.savez or np.save)"
    )


def _npy_member(path: Path) -> _Member:
    with path.open("rb") as f:
        header = _parse_header("array (.npy)", f.read(_NPY_PREFIX_BYTES), SINGLE_ARRAY)
    _check_total([header])
    _check_member_size("array (.npy)", header, path.stat().st_size)
    return _Member(None, header)


def _npz_members(path: Path) -> dict[str, _Member]:
    _check_zip_directory(path)
    members: dict[str, _Member] = {}
    with _open_zip(path) as archive:
        infos = archive.infolist()
        if len(infos) > MAX_SAMPLE_ARRAYS:
            raise InvalidArgument(
                f"sample data holds {len(infos)} arrays; at most {MAX_SAMPLE_ARRAYS} are "
                "accepted (MAX_SAMPLE_ARRAYS: one per model input, plus 'labels')"
            )
        for info in infos:
            name = _array_name(info)
            label = f"array {name!r}"
            if name in members:
                raise InvalidArgument(f"sample data has two members named {info.filename!r}")
            _check_member_info(label, info)
            with _reading(label), archive.open(info) as member:
                prefix = member.read(_NPY_PREFIX_BYTES)
            header = _parse_header(label, prefix, name)
            _check_member_size(label, header, info.file_size)
            members[name] = _Member(info, header)
    _check_total([m.header for m in members.values()])
    return members


def _check_zip_directory(path: Path) -> None:
    """Refuse an oversized central directory before zipfile parses it (see
    MAX_ZIP_DIRECTORY_BYTES). zipfile's reader of the end record is private,
    so this reads the fixed record itself, finding it as zipfile does: at
    the very end, or before a trailing comment."""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - _EOCD.size - _MAX_ZIP_COMMENT))
        tail = f.read()
    at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        raise InvalidArgument(
            "sample data is not a valid .npz archive: no zip end-of-directory record "
            "(the file is truncated or not a zip)"
        )
    directory_bytes = _EOCD.unpack_from(tail, at)[5]
    if directory_bytes > MAX_ZIP_DIRECTORY_BYTES:
        raise InvalidArgument(
            f"sample data's zip directory is {directory_bytes} bytes; at most "
            f"{MAX_ZIP_DIRECTORY_BYTES} are accepted (MAX_ZIP_DIRECTORY_BYTES: a sample "
            f"archive holds at most {MAX_SAMPLE_ARRAYS} arrays)"
        )


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise InvalidArgument(f"sample data is not a valid .npz archive: {exc}") from exc


def _array_name(info: zipfile.ZipInfo) -> str:
    # np.load names an array after its member without the .npy suffix; any
    # other member it would hand back as raw bytes, which no build can use.
    if info.is_dir() or not info.filename.endswith(".npy") or info.filename == ".npy":
        raise InvalidArgument(
            f"sample data member {info.filename!r} is not an array: every member of the "
            ".npz must be NAME.npy (write it with np.savez)"
        )
    return info.filename[: -len(".npy")]


def _check_member_info(label: str, info: zipfile.ZipInfo) -> None:
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise InvalidArgument(f"sample data {label} is encrypted")
    if info.compress_type not in ACCEPTED_COMPRESSION:
        raise InvalidArgument(
            f"sample data {label} uses zip compression method {info.compress_type}; only "
            "stored or deflate are accepted (as np.savez / np.savez_compressed write)"
        )
    # The member's declared size bounds what zipfile will ever inflate from
    # it; refuse it before reading even the header.
    most = MAX_SAMPLE_ARRAY_BYTES + _NPY_PREFIX_BYTES
    if info.file_size > most:
        raise InvalidArgument(
            f"sample data {label} declares {_size(info.file_size)} uncompressed, over the "
            f"limit of {_size(MAX_SAMPLE_ARRAY_BYTES)} per array (MAX_SAMPLE_ARRAY_BYTES)"
        )


def _parse_header(label: str, prefix: bytes, name: str) -> ArrayHeader:
    """An ArrayHeader from the first bytes of an .npy stream, with numpy's
    own readers; refuses what the limits and accepted dtypes do not allow."""
    stream = io.BytesIO(prefix)
    try:
        version = npy_format.read_magic(stream)
        read: Callable[..., tuple[tuple[int, ...], bool, np.dtype[Any]]]
        if version == (1, 0):
            read = npy_format.read_array_header_1_0
        elif version == (2, 0):
            read = npy_format.read_array_header_2_0
        else:
            raise ValueError(
                f".npy format version {version[0]}.{version[1]} is not accepted (only 1.0 and "
                "2.0; 3.0 is for structured arrays)"
            )
        shape, fortran_order, dtype = read(stream, max_header_size=MAX_NPY_HEADER_CHARS)
    except (ValueError, TypeError, EOFError, struct.error, SyntaxError, tokenize.TokenError) as exc:
        # numpy parses the header dict with Python's tokenizer (and its
        # literal_eval): a header it cannot tokenize raises TokenError or
        # SyntaxError, not ValueError.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidArgument(
            f"sample data {label} has no valid .npy header: {first_line}"
        ) from exc
    if dtype.kind not in ACCEPTED_DTYPE_KINDS or dtype.names is not None or dtype.subdtype:
        raise InvalidArgument(
            f"sample data {label} has dtype {dtype.str!r} ({dtype}); only bool, integer, float "
            "and complex arrays are accepted (no object, structured, void, string or datetime)"
        )
    if len(shape) > MAX_SAMPLE_ARRAY_DIMS or any(d < 0 for d in shape):
        raise InvalidArgument(
            f"sample data {label} declares an impossible shape {list(shape)} (dimensions must "
            f"be non-negative, at most {MAX_SAMPLE_ARRAY_DIMS} of them)"
        )
    # Python ints: an absurd shape cannot overflow into a small number.
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_SAMPLE_ARRAY_BYTES:
        raise InvalidArgument(
            f"sample data {label} declares shape {list(shape)} of {dtype} = {_size(nbytes)}, "
            f"over the limit of {_size(MAX_SAMPLE_ARRAY_BYTES)} per array "
            "(MAX_SAMPLE_ARRAY_BYTES)"
        )
    return ArrayHeader(name, tuple(shape), dtype, fortran_order, nbytes, stream.tell())


def _check_member_size(label: str, header: ArrayHeader, size: int) -> None:
    expected = header.header_bytes + header.nbytes
    if size < expected:
        raise InvalidArgument(
            f"sample data {label} is truncated: its header declares shape "
            f"{list(header.shape)} of {header.dtype} ({header.nbytes} bytes) but it holds "
            f"{max(0, size - header.header_bytes)} bytes of data"
        )
    if size > expected:
        raise InvalidArgument(
            f"sample data {label} has {size - expected} bytes after the "
            f"{header.nbytes} bytes of data its header declares"
        )


def _check_total(headers: Sequence[ArrayHeader]) -> None:
    total = sum(h.nbytes for h in headers)
    if total > MAX_SAMPLE_TOTAL_BYTES:
        raise InvalidArgument(
            f"sample data arrays declare {_size(total)} in total, over the limit of "
            f"{_size(MAX_SAMPLE_TOTAL_BYTES)} per sample file (MAX_SAMPLE_TOTAL_BYTES)"
        )


class _RowReader:
    """One array's data as it streams past: all of it, or only the rows
    `picked_rows` picks along its first axis."""

    def __init__(self, header: ArrayHeader, rows: int | None) -> None:
        self._header = header
        count = header.shape[0] if header.shape else 0
        self._picked: np.ndarray | None = None
        self._shape = header.shape
        # Source bytes seen so far, and where reading may stop.
        self._seen = 0
        self.end = header.nbytes
        if rows is not None and count > rows:
            picked = picked_rows(count, rows)
            self._picked = picked
            self._shape = (len(picked), *header.shape[1:])
            item = header.dtype.itemsize
            self._row_bytes = header.nbytes // count
            if self._row_bytes == 0:
                self.end = 0  # rows of no bytes: nothing to read
            elif header.fortran_order:
                # Element (row, col) lies at flat index row + count * col:
                # the last picked row of the last column ends the data read.
                columns = self._row_bytes // item
                self.end = (int(picked[-1]) + count * (columns - 1) + 1) * item
                self._pending = b""
            else:
                # C order: each row is one contiguous run of bytes.
                self.end = (int(picked[-1]) + 1) * self._row_bytes
        self._buffer = np.empty(math.prod(self._shape) * header.dtype.itemsize, np.uint8)

    def take(self, chunk: bytes) -> None:
        start = self._seen
        self._seen += len(chunk)
        data = np.frombuffer(chunk, np.uint8)
        if self._picked is None:
            self._buffer[start : start + len(chunk)] = data
        elif self._header.fortran_order:
            self._take_fortran(chunk)
        else:
            self._take_rows(start, data)

    def _take_rows(self, start: int, data: np.ndarray) -> None:
        """Copy the parts of picked rows that lie in source bytes
        [start, start + len(data)): at most one loop step per picked row,
        plus one per chunk."""
        assert self._picked is not None
        size = self._row_bytes
        stop = start + len(data)
        k = int(np.searchsorted(self._picked, start // size))
        while k < len(self._picked):
            row_start = int(self._picked[k]) * size
            if row_start >= stop:
                break
            lo, hi = max(start, row_start), min(stop, row_start + size)
            if lo < hi:
                at = k * size + (lo - row_start)
                self._buffer[at : at + hi - lo] = data[lo - start : hi - start]
            if row_start + size > stop:
                break
            k += 1

    def _take_fortran(self, chunk: bytes) -> None:
        """Fortran order: a picked row is one element per column, so the
        elements in the chunk are picked by arithmetic, a bounded block at a
        time (an element cut by the chunk's end waits for the next chunk)."""
        assert self._picked is not None
        item = self._header.dtype.itemsize
        count = self._header.shape[0]
        picked = len(self._picked)
        data = self._pending + chunk if self._pending else chunk
        whole = len(data) // item * item
        self._pending = data[whole:]
        first = (self._seen - len(data)) // item  # `data` ends where the stream is
        elements = np.frombuffer(data, np.uint8, whole).reshape(-1, item)
        out = self._buffer.reshape(-1, item)
        block = 1 << 16
        for offset in range(0, len(elements), block):
            index = np.arange(first + offset, first + min(offset + block, len(elements)))
            row, column = index % count, index // count
            # The one k with k * count // picked == row, if any.
            k = (row * picked + count - 1) // count
            keep = (k < picked) & (k * count // picked == row)
            out[(k + picked * column)[keep]] = elements[offset : offset + len(index)][keep]

    def array(self) -> np.ndarray:
        h = self._header
        flat = self._buffer.view(h.dtype)
        shape = self._shape
        array = flat.reshape(shape[::-1]).transpose() if h.fortran_order else flat.reshape(shape)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        return array


def _read_data(
    path: Path,
    members: Mapping[str, _Member],
    sink: Callable[[str, bytes], None],
    ends: Mapping[str, int] | None = None,
) -> None:
    """Hand each array's data bytes to `sink` in chunks of at most
    READ_CHUNK_BYTES: exactly the declared size, never more; with `ends`, only
    the first ends[name] bytes of an array (its CRC is then not checked)."""
    if SINGLE_ARRAY in members and members[SINGLE_ARRAY].info is None:
        header = members[SINGLE_ARRAY].header
        end = header.nbytes if ends is None else ends[SINGLE_ARRAY]
        with path.open("rb") as f:
            f.seek(header.header_bytes)
            _stream("array (.npy)", f, SINGLE_ARRAY, header.nbytes, end, sink)
        return
    with _open_zip(path) as archive:
        for name, member in members.items():
            assert member.info is not None
            label = f"array {name!r}"
            end = member.header.nbytes if ends is None else ends[name]
            with _reading(label), archive.open(member.info) as f:
                f.read(member.header.header_bytes)
                _stream(label, f, name, member.header.nbytes, end, sink)
                if end == member.header.nbytes:
                    # At the member's declared end zipfile checks its CRC;
                    # the sizes were matched above, so this read returns
                    # nothing.
                    f.read(1)


def _stream(
    label: str,
    f: IO[bytes],
    name: str,
    nbytes: int,
    end: int,
    sink: Callable[[str, bytes], None],
) -> None:
    """Hand the first `end` of the `nbytes` data bytes in `f` to `sink`."""
    left = end
    while left > 0:
        chunk = f.read(min(left, READ_CHUNK_BYTES))
        if not chunk:
            raise InvalidArgument(
                f"sample data {label} is truncated: {end - left} of the {nbytes} bytes its "
                "header declares are there"
            )
        sink(name, chunk)
        left -= len(chunk)


@contextmanager
def _reading(label: str) -> Iterator[None]:
    """Map what zipfile and zlib raise on a damaged member to InvalidArgument."""
    try:
        yield
    except EOFError as exc:
        raise InvalidArgument(f"sample data {label} is truncated: {exc}") from exc
    except (zipfile.BadZipFile, zlib.error, OSError, RuntimeError) as exc:
        raise InvalidArgument(f"sample data {label} is corrupted: {exc}") from exc


def _size(nbytes: int) -> str:
    if nbytes >= 2**70:  # no float formatting of an absurd product
        return "more than 1 ZiB"
    for unit, scale in (("GiB", 1024**3), ("MiB", MiB), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f}".removesuffix(".0") + f" {unit}"
    return f"{nbytes} bytes"
