"""``.npz`` archives that survive crashes, concurrent writers and hostile bytes.

:func:`write_npz` replaces a file atomically and durably: the archive is written to a
temporary file of a unique name *in the target's directory* (so two writers never share
it, and the rename never crosses a file system), flushed and ``fsync``-ed, renamed over the
target with ``os.replace``, and the directory is ``fsync``-ed so the rename itself survives
a power loss. A reader opening the path at any moment sees the old or the new complete file.

:func:`read_npz` reads every member of such an archive into memory and raises
:class:`CorruptArchive` (a ``ValueError``) for anything that is not a well-formed archive
of plain numeric arrays, whatever the bytes: each member's ``.npy`` header is parsed and its
declared size checked against the member's size *before* anything is allocated, so a
header declaring a 128 TiB array costs nothing; sizes are bounded by the file's own size
(stored members) or by the most that deflate can expand (1032 to 1); other compression
methods are refused rather than decompressed. Decompression, CRC and truncation errors
become :class:`CorruptArchive` too.
"""

from __future__ import annotations

import math
import os
import secrets
import struct
import tokenize
import zipfile
import zlib

import numpy as np

__all__ = ["CorruptArchive", "write_npz", "read_npz"]

#: The most the DEFLATE format can expand its input (RFC 1951: a 258-byte match costs at
#: least 2 bits), so a deflated member's true size is at most this times its stored size.
MAX_DEFLATE_RATIO = 1032
_METHODS = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: MAX_DEFLATE_RATIO}  # method -> size bound
_NPY_MAGIC = b"\x93NUMPY"
_PLAIN_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what a checkpoint holds


class CorruptArchive(ValueError):
    """The bytes are not a well-formed ``.npz`` archive of plain numeric arrays."""


def write_npz(path, arrays: dict) -> None:
    """Write ``arrays`` (name -> NumPy array) to ``path`` as an uncompressed ``.npz``, atomically.

    On any error the temporary file is removed and an existing file at ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = _create_unique(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the name points to it
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _create_unique(directory: str, base: str) -> tuple[int, str]:
    """A new file ``<base>.<random>.tmp`` in ``directory``, opened for writing.

    Like ``tempfile.mkstemp`` (``O_EXCL``: never an existing file), but created with mode
    ``0o666`` so the process umask applies and the checkpoint gets the permissions a plain
    ``open(path, "wb")`` would give it (``mkstemp``'s ``0o600`` would survive the rename).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(directory, f"{base}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 2**-64 per try
            continue


def _fsync_directory(directory: str) -> None:
    """Make the rename durable; platforms that cannot open a directory (Windows) skip it."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What zipfile, zlib and the .npy header parser (ast.literal_eval, and tokenize for the
# headers of Python 2) raise on damaged bytes; OSError: a seek that a damaged directory sends
# before the start of the file.
_DAMAGE = (zipfile.BadZipFile, zlib.error, struct.error, EOFError, KeyError, NotImplementedError, RuntimeError,
           UnicodeDecodeError, OverflowError, ValueError, SyntaxError, tokenize.TokenError, RecursionError,
           TypeError, OSError)


def read_npz(path) -> dict[str, np.ndarray]:
    """Every member of the ``.npz`` at ``path``: ``{name without ".npy": array}`` in archive order.

    A missing or unopenable file raises its ``OSError`` (``FileNotFoundError``, ...);
    everything else that is wrong with the bytes raises :class:`CorruptArchive`.
    """
    with open(os.fspath(path), "rb") as fh:  # one open: a concurrent replace cannot mix two files
        size = os.fstat(fh.fileno()).st_size
        if fh.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            raise CorruptArchive("a single .npy array, not an .npz archive")
        fh.seek(0)
        try:
            with zipfile.ZipFile(fh) as archive:
                return _read_members(archive, size)
        except CorruptArchive:
            raise
        except _DAMAGE as exc:
            raise CorruptArchive(f"{type(exc).__name__}: {exc}") from exc


def _read_members(archive: zipfile.ZipFile, file_size: int) -> dict[str, np.ndarray]:
    members: dict[str, np.ndarray] = {}
    for info in archive.infolist():
        name = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
        if name in members:
            raise CorruptArchive(f"member {info.filename!r} appears twice")
        members[name] = _read_member(archive, info, file_size)
    return members


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, file_size: int) -> np.ndarray:
    """One ``.npy`` member, its declared sizes checked before anything is allocated."""
    where = f"member {info.filename!r}"
    _check_sizes(info, file_size, where)
    if not info.filename.endswith(".npy"):  # not written by np.savez: its bytes, for the caller to refuse
        return np.frombuffer(archive.read(info), dtype=np.uint8)
    with archive.open(info) as fp:
        shape, fortran, dtype = _read_header(fp, where)
        data_bytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if fp.tell() + data_bytes != info.file_size:
            raise CorruptArchive(f"{where}: its header declares {data_bytes} bytes of data, "
                                 f"it holds {info.file_size - fp.tell()}")
        buffer = bytearray(data_bytes)
        if fp.readinto(buffer) != data_bytes or fp.read(1):  # the last read also checks the CRC
            raise CorruptArchive(f"{where}: truncated data")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _check_sizes(info: zipfile.ZipInfo, file_size: int, where: str) -> None:
    """The member's declared sizes are possible for this file (no allocation beyond them)."""
    if info.compress_type not in _METHODS:
        raise CorruptArchive(f"{where} uses compression method {info.compress_type}; "
                             "checkpoints are stored (or deflated)")
    if info.compress_size > file_size or info.file_size > _METHODS[info.compress_type] * info.compress_size:
        raise CorruptArchive(f"{where} declares {info.file_size} bytes in {info.compress_size} "
                             f"(the file has {file_size})")


def _read_header(fp, where: str) -> tuple[tuple, bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of a ``.npy`` header: versions 1.0 and 2.0, plain
    numeric dtypes (no objects, records or sub-arrays), non-negative dimensions."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise CorruptArchive(f"{where}: .npy format version {version} is not supported")
    if dtype.kind not in _PLAIN_KINDS or dtype.names is not None or dtype.shape != ():
        raise CorruptArchive(f"{where}: dtype {dtype} is not a plain numeric type")
    if any(n < 0 for n in shape):
        raise CorruptArchive(f"{where}: negative dimension in shape {shape}")
    return shape, fortran, dtype
