"""Checkpoint files under hostile bytes, crashes and concurrency (``specs/layout.md`` §4.4-§4.6).

* Loading raises nothing but the documented exceptions (``ValueError``, ``TypeError``; the
  object unchanged) whatever the bytes: a hypothesis fuzz of byte mutations, truncations and
  insertions of a valid file, of member payloads re-zipped with valid CRCs, and of the JSON
  metadata; crafted ``.npy`` headers (a declared 128 TiB array, negative or object shapes,
  unknown versions) and ZIP entries (LZMA/bzip2 members, a deflated member declaring 4 GiB,
  duplicates) are refused before anything is allocated.
* Writing: a unique temporary file in the target's directory, ``fsync`` of the file before
  the rename and of the directory after it, the umask's permissions, no file left behind on
  failure; two processes saving to one path while a third loads it: every load is complete.
* The family: a checkpoint of another member or profile is refused, saying which; version 1
  files (no member key) still load.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upgd_ref import UPGD, UPGDW, AdaptiveUPGD, FlatLayout, VarianceGradientScaler
from upgd_ref import archive
from upgd_ref.checkpoint import read_state_dict
from upgd_ref.state import UPGD_VERSION

from tests.helpers.snapshots import assert_unchanged, random_buffers, snapshot

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
SHAPES = [(3, 2), (4,)]
DOCUMENTED = (ValueError, TypeError)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _trained(cls=AdaptiveUPGD, seed=5, **kwargs):
    layout = FlatLayout(SHAPES, dtype="float32")
    opt = cls(layout, lr=1e-2, seed=seed, backend="reference", **kwargs)
    vgs = VarianceGradientScaler(layout, warmup_steps=0, backend="reference")
    params, grads = random_buffers(layout, seed)
    for _ in range(3):
        opt.step(params, grads.copy(), vgs=vgs)
    return opt, vgs


def _saved(obj, tmp_path, name="good.npz") -> bytes:
    obj.save(tmp_path / name)
    return (tmp_path / name).read_bytes()


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive_file:
        return {info.filename: archive_file.read(info) for info in archive_file.infolist()}


def _zip(members: dict, compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive_file:
        for name, payload in members.items():
            archive_file.writestr(name, payload)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_header(descr: str, shape, fortran=False, version=(1, 0)) -> bytes:
    """A ``.npy`` header (no data) declaring ``descr`` and ``shape``."""
    text = repr({"descr": descr, "fortran_order": fortran, "shape": tuple(shape)}).encode("latin1")
    prefix = 10 if version == (1, 0) else 12
    text += b" " * ((-(prefix + len(text) + 1)) % 64) + b"\n"
    size = struct.pack("<H", len(text)) if version == (1, 0) else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes(version) + size + text


def _load_outcome(target, path):
    """``None`` if the load succeeded, else the exception (which must be documented)."""
    try:
        target.load(path)
    except DOCUMENTED as exc:
        return exc
    return None


def _assert_rejected_or_consistent(target, before, path, expected=None):
    """The load raised a documented exception and changed nothing, or it succeeded and the
    target now holds a state that saves and loads back bit-exactly (``expected``: that state)."""
    error = _load_outcome(target, path)
    if error is not None:
        assert_unchanged(before, snapshot(target))
        return error
    state = target.state_dict()
    if expected is not None:
        assert snapshot(state) == snapshot(expected)
    clone = type(target)(target.layout, backend="reference")
    clone.load_state_dict(state)
    assert snapshot(clone.state) == snapshot(target.state)
    return None


# --- fuzz ----------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzzed_file_bytes_raise_only_documented_errors(tmp_path, data):
    source, _ = _trained()
    good = _saved(source, tmp_path)
    damaged = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        kind = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]), label="kind")
        at = data.draw(st.integers(0, max(len(damaged) - 1, 0)), label="at")
        if kind == "flip" and damaged:
            damaged[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and damaged:
            damaged[at] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del damaged[at:]
        elif kind == "insert":
            damaged[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        elif damaged:
            del damaged[at : at + data.draw(st.integers(1, 64))]
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    target, _ = _trained(seed=9)
    before = snapshot(target)
    _assert_rejected_or_consistent(target, before, tmp_path / "damaged.npz",
                                   expected=source.state_dict() if bytes(damaged) == good else None)


@FUZZ
@given(data=st.data())
def test_fuzzed_member_payloads_with_valid_crcs_raise_only_documented_errors(tmp_path, data):
    """Mutations inside one member, re-zipped (CRCs valid): the header parser, the metadata
    decoder and the state checks see them, not the ZIP layer."""
    source, vgs = _trained()
    target_is_scaler = data.draw(st.booleans(), label="scaler")
    members = _members(_saved(vgs if target_is_scaler else source, tmp_path))
    name = data.draw(st.sampled_from(sorted(members)), label="member")
    payload = bytearray(members[name])
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        at = data.draw(st.integers(0, len(payload) - 1), label="at")
        if data.draw(st.booleans(), label="truncate"):
            del payload[at:]
            break
        payload[at] = data.draw(st.integers(0, 255))
    members[name] = bytes(payload)
    (tmp_path / "member.npz").write_bytes(_zip(members))
    target = _trained(seed=9)[1 if target_is_scaler else 0]
    before = snapshot(target)
    error = _load_outcome(target, tmp_path / "member.npz")
    if error is not None:
        assert_unchanged(before, snapshot(target))
    else:
        assert all(np.isfinite(v).all() for v in target.state_dict()["state"].values() if isinstance(v, np.ndarray))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)


def _write_unchecked(path, state_dict):
    """As ``write_state_dict``, but JSON may hold what it refuses to write (``Infinity``, ``NaN``)."""
    meta = {k: v for k, v in state_dict.items() if k != "state"}
    meta["state_scalars"] = {k: v for k, v in state_dict["state"].items() if not isinstance(v, np.ndarray)}
    arrays = {f"state.{k}": v for k, v in state_dict["state"].items() if isinstance(v, np.ndarray)}
    encoded = json.dumps(meta, default=lambda v: v.item()).encode()
    archive.write_npz(path, {"meta": np.frombuffer(encoded, dtype=np.uint8), **arrays})


@FUZZ
@given(data=st.data())
def test_fuzzed_metadata_values_raise_only_documented_errors(tmp_path, data):
    """Any JSON value in place of any metadata entry (top level, layout, a parameter group)."""
    source, _ = _trained()
    state_dict = source.state_dict()
    where = data.draw(st.sampled_from(["top", "layout", "group", "scalar"]), label="where")
    container = {"top": state_dict, "layout": state_dict["layout"], "group": state_dict["param_groups"][0],
                 "scalar": state_dict["state"]}[where]
    key = data.draw(st.sampled_from(sorted(k for k in container if k != "state")), label="key")
    container[key] = data.draw(JSON, label="value")
    _write_unchecked(tmp_path / "meta.npz", state_dict)
    target, _ = _trained(seed=9)
    before = snapshot(target)
    _assert_rejected_or_consistent(target, before, tmp_path / "meta.npz")


# --- crafted archives ------------------------------------------------------------------------


def _with_member(source, tmp_path, name, payload):
    members = _members(_saved(source, tmp_path))
    members[name] = payload
    return _zip(members)


TIB_128 = 2**47 // 4  # float32 elements in 128 TiB

CRAFTED = {
    "128 TiB utility": (lambda s, t: _with_member(s, t, "state.utility.npy", _npy_header("<f4", (TIB_128,))),
                        r"declares 140737488355328 bytes"),
    "128 TiB in a 2-D shape": (lambda s, t: _with_member(s, t, "state.utility.npy", _npy_header("<f4", (2**20, 2**25))),
                               r"declares"),
    "huge metadata array": (lambda s, t: _with_member(s, t, "meta.npy", _npy_header("|u1", (2**62,))), r"declares"),
    "negative dimension": (lambda s, t: _with_member(s, t, "state.utility.npy", _npy_header("<f4", (-7,))),
                           r"negative dimension|not a readable"),
    "object dtype": (lambda s, t: _with_member(s, t, "state.utility.npy", _npy_header("|O", (7,)) + b"\0" * 56),
                     r"not a plain numeric type"),
    "record dtype": (lambda s, t: _with_member(s, t, "state.utility.npy",
                                               _npy_header("[('a', '<f4')]", (7,)) + b"\0" * 28),
                     r"not a plain numeric type|not a readable"),
    "string dtype": (lambda s, t: _with_member(s, t, "state.utility.npy", _npy_header("<U3", (7,)) + b"\0" * 84),
                     r"not a plain numeric type"),
    "npy version 3.0": (lambda s, t: _with_member(s, t, "state.utility.npy", _npy_header("<f4", (7,), version=(3, 0))
                                                  + b"\0" * 28), r"format version \(3, 0\)"),
    "npy version 9.9": (lambda s, t: _with_member(s, t, "state.utility.npy", b"\x93NUMPY\x09\x09" + b"\0" * 60),
                        r"not a readable"),
    "header not a dict": (lambda s, t: _with_member(s, t, "state.utility.npy",
                                                    b"\x93NUMPY\x01\x00" + struct.pack("<H", 6) + b"[1,2]\n"),
                          r"not a readable"),
    "header of 1 MB": (lambda s, t: _with_member(s, t, "state.utility.npy",
                                                 b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**20) + b" " * 2**20),
                       r"not a readable"),
    "data shorter than declared": (lambda s, t: _with_member(s, t, "state.utility.npy",
                                                             _npy(np.zeros(7, np.float32))[:-4]),
                                   r"declares 28 bytes of data, it holds 24"),
    "trailing bytes after the data": (lambda s, t: _with_member(s, t, "state.utility.npy",
                                                                _npy(np.zeros(7, np.float32)) + b"\0"),
                                      r"declares 28 bytes of data, it holds 29"),
    "duplicate member": (lambda s, t: _zip_duplicate(s, t), r"appears twice"),
}


def _zip_duplicate(source, tmp_path):
    members = _members(_saved(source, tmp_path))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive_file:
        for name, payload in members.items():
            archive_file.writestr(name, payload)
        archive_file.writestr("state.utility.npy", members["state.utility.npy"])
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile warns while the test builds that case
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_members_are_refused_before_allocating(case, tmp_path):
    source, _ = _trained()
    target, _ = _trained(seed=9)
    make, match = CRAFTED[case]
    (tmp_path / "crafted.npz").write_bytes(make(source, tmp_path))
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load(tmp_path / "crafted.npz")
    assert_unchanged(before, snapshot(target))


@pytest.mark.parametrize("method", [zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2], ids=["lzma", "bzip2"])
@pytest.mark.parametrize("damage", ["intact", "damaged stream"])
def test_other_compression_methods_are_refused_unread(method, damage, tmp_path):
    """LZMA and bzip2 members (no small bound on how much they expand) are refused by method,
    so a damaged stream cannot raise LZMAError/OSError either."""
    source, _ = _trained()
    data = bytearray(_zip(_members(_saved(source, tmp_path)), compression=method))
    if damage == "damaged stream":
        start = data.index(b"PK\x03\x04") + 60
        data[start : start + 20] = b"\xff" * 20
    (tmp_path / "other.npz").write_bytes(bytes(data))
    target, _ = _trained(seed=9)
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"compression method {method}"):
        target.load(tmp_path / "other.npz")
    assert_unchanged(before, snapshot(target))


def _patch_central_sizes(data: bytes, name: bytes, *, file_size=None) -> bytes:
    """``data`` with the central directory's uncompressed size of member ``name`` replaced."""
    data = bytearray(data)
    at = 0
    while True:
        at = data.index(b"PK\x01\x02", at)
        name_length = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46 : at + 46 + name_length]) == name:
            struct.pack_into("<I", data, at + 24, file_size)
            return bytes(data)
        at += 4


def test_deflated_checkpoints_load(tmp_path):
    """``np.savez_compressed``-style (deflated) files load."""
    source, _ = _trained()
    (tmp_path / "deflated.npz").write_bytes(_zip(_members(_saved(source, tmp_path)), compression=zipfile.ZIP_DEFLATED))
    target, _ = _trained(seed=9)
    target.load(tmp_path / "deflated.npz")
    assert snapshot(target.state_dict()) == snapshot(source.state_dict())


@pytest.mark.parametrize("compression, member", [(zipfile.ZIP_DEFLATED, "state.utility.npy"),
                                                 (zipfile.ZIP_STORED, "state.first_moment.npy")],
                         ids=["deflated", "stored"])
def test_a_member_declaring_more_than_its_bytes_can_hold_is_refused(compression, member, tmp_path):
    """4 GiB declared for a few hundred bytes (more than the file, or than deflate can expand
    them to): refused before anything is read or allocated."""
    source, _ = _trained()
    archive_bytes = _zip(_members(_saved(source, tmp_path)), compression=compression)
    (tmp_path / "bloated.npz").write_bytes(_patch_central_sizes(archive_bytes, member.encode(), file_size=2**32 - 2))
    target, _ = _trained(seed=9)
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"member '{member}' declares 4294967294 bytes"):
        target.load(tmp_path / "bloated.npz")
    assert_unchanged(before, snapshot(target))


def test_fortran_order_and_writable_results(tmp_path):
    """A valid Fortran-ordered member reads as the array it holds; arrays read are writable copies."""
    values = np.arange(6, dtype=np.float64).reshape(2, 3)
    (tmp_path / "f.npz").write_bytes(_zip({"x.npy": _npy(np.asfortranarray(values))}))
    read = archive.read_npz(tmp_path / "f.npz")
    assert list(read) == ["x"] and np.array_equal(read["x"], values) and read["x"].flags.writeable


# --- writing ----------------------------------------------------------------------------------


def test_save_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path, monkeypatch):
    source, _ = _trained()
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "directory" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"
        events.append(("fsync", kind))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.dirname(src) == os.path.dirname(dst) == str(tmp_path),
                       os.path.basename(src).startswith("opt.npz.") and src.endswith(".tmp")))
        real_replace(src, dst)

    monkeypatch.setattr(archive.os, "fsync", fsync)
    monkeypatch.setattr(archive.os, "replace", replace)
    source.save(tmp_path / "opt.npz")
    assert events == [("fsync", "file"), ("replace", True, True), ("fsync", "directory")]
    assert os.listdir(tmp_path) == ["opt.npz"]


def test_save_gives_the_permissions_of_a_plain_open_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    source, _ = _trained()
    umask = os.umask(0o027)
    try:
        source.save(tmp_path / "opt.npz")
    finally:
        os.umask(umask)
    assert (tmp_path / "opt.npz").stat().st_mode & 0o777 == 0o640
    good = (tmp_path / "opt.npz").read_bytes()

    def failing_savez(fh, **arrays):
        fh.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive.np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space left"):
        source.save(tmp_path / "opt.npz")
    assert os.listdir(tmp_path) == ["opt.npz"] and (tmp_path / "opt.npz").read_bytes() == good


def test_two_writers_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Each save creates its own ``<name>.<random>.tmp`` with O_EXCL."""
    created = []
    real_open = os.open

    def spy(path, flags, mode=0o777, **kwargs):
        if str(path).endswith(".tmp"):
            created.append((str(path), bool(flags & os.O_EXCL)))
        return real_open(path, flags, mode, **kwargs)

    monkeypatch.setattr(archive.os, "open", spy)
    source, vgs = _trained()
    for _ in range(3):
        source.save(tmp_path / "same.npz")
        vgs.save(tmp_path / "same.npz")
    assert len({path for path, _ in created}) == 6 and all(excl for _, excl in created)


_WRITER = r"""
import sys, numpy as np, upgd_ref
layout = upgd_ref.FlatLayout([(300,), (41, 3)], dtype="float64")
opt = upgd_ref.AdaptiveUPGD(layout, seed=int(sys.argv[2]), backend="reference")
opt.state.utility[...] = float(sys.argv[2])  # each writer's state is recognisable
for _ in range(int(sys.argv[3])):
    opt.save(sys.argv[1])
"""

_READER = r"""
import json, sys, time, numpy as np, upgd_ref
layout = upgd_ref.FlatLayout([(300,), (41, 3)], dtype="float64")
opt = upgd_ref.AdaptiveUPGD(layout, backend="reference")
seen, deadline = {}, time.monotonic() + float(sys.argv[3])
for _ in range(int(sys.argv[2])):
    opt.load(sys.argv[1])  # the file always exists: any exception is a corrupt read
    values = set(np.unique(opt.state.utility[layout.segment_slice(0)]).tolist())
    assert len(values) == 1 and opt.seed == values.pop(), "a mixed or torn file"
    seen[opt.seed] = seen.get(opt.seed, 0) + 1
    if time.monotonic() > deadline:
        break
print(json.dumps(seen))
"""


def test_two_processes_saving_while_a_third_loads(tmp_path):
    path = tmp_path / "shared.npz"
    env = dict(os.environ, NUMBA_DISABLE_JIT="0")
    run = [sys.executable, "-c"]
    subprocess.run([*run, _WRITER, str(path), "1", "1"], check=True, cwd=ROOT, timeout=120, env=env)
    writers = [subprocess.Popen([*run, _WRITER, str(path), str(seed), "150"], cwd=ROOT, env=env) for seed in (1, 2)]
    reader = subprocess.run([*run, _READER, str(path), "400", "90"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300, env=env)
    for writer in writers:
        assert writer.wait(timeout=300) == 0
    assert reader.returncode == 0, reader.stderr[-3000:]
    seen = json.loads(reader.stdout.splitlines()[-1])
    assert sum(seen.values()) > 0 and set(seen) <= {"1", "2"}
    assert os.listdir(tmp_path) == ["shared.npz"]  # no temporary file left behind


# --- the family ------------------------------------------------------------------------------


FAMILY = {
    "AdaptiveUPGD": (AdaptiveUPGD, {}),
    "AdaptiveUPGD paper": (AdaptiveUPGD, {"profile": "paper"}),
    "UPGD": (UPGD, {}),
    "UPGD paper": (UPGD, {"profile": "paper"}),
    "UPGDW": (UPGDW, {}),
}


@pytest.mark.parametrize("saved", sorted(FAMILY))
@pytest.mark.parametrize("loader", sorted(FAMILY))
def test_a_checkpoint_loads_only_into_its_member_and_profile(saved, loader, tmp_path):
    cls, kwargs = FAMILY[saved]
    source, _ = _trained(cls, **kwargs)
    source.save(tmp_path / "ckpt.npz")
    assert read_state_dict(tmp_path / "ckpt.npz")["version"] == UPGD_VERSION
    target_cls, target_kwargs = FAMILY[loader]
    target, _ = _trained(target_cls, seed=9, **target_kwargs)
    if saved == loader:
        target.load(tmp_path / "ckpt.npz")
        assert snapshot(target.state_dict()) == snapshot(source.state_dict())
        return
    before = snapshot(target)
    profile = FAMILY[saved][1].get("profile", "production")
    with pytest.raises(ValueError, match=rf"checkpoint of {cls.__name__} \(profile '{profile}'\); this optimizer is "
                                         rf"{target_cls.__name__}"):
        target.load(tmp_path / "ckpt.npz")
    assert_unchanged(before, snapshot(target))


@pytest.mark.parametrize("case", [("member", 3, TypeError, r"'member' must be a str"),
                                  ("profile", None, TypeError, r"'profile' must be a str"),
                                  ("member", "Adam", ValueError, r"checkpoint of Adam"),
                                  ("profile", "paper", ValueError, r"profile 'paper'")], ids=str)
def test_bad_member_fields_are_refused(case):
    key, value, error, match = case
    source, _ = _trained(UPGDW)
    state_dict = source.state_dict()
    state_dict[key] = value
    target, _ = _trained(UPGDW, seed=9)
    before = snapshot(target)
    with pytest.raises(error, match=match):
        target.load_state_dict(state_dict)
    assert_unchanged(before, snapshot(target))


@pytest.mark.parametrize("name, cls, kwargs", [("adaptive_upgd", AdaptiveUPGD, {}), ("upgdw", UPGDW, {}),
                                               ("upgd_paper", UPGD, {"profile": "paper"})])
def test_version_1_checkpoints_still_load(name, cls, kwargs):
    """Files written before the member key (version 1, committed in tests/core/data) load into
    their class; without the key only the variant is compared, so a version-1 UPGDW file
    also loads into AdaptiveUPGD, as it always did (specs/layout.md §4.6)."""
    path = DATA / f"{name}_v1.npz"
    saved = read_state_dict(path)
    assert saved["version"] == 1 and "member" not in saved
    layout = FlatLayout(SHAPES, dtype="float32")
    target = cls(layout, backend="reference", **kwargs)
    target.load(path)
    loaded = target.state_dict()["state"]
    assert loaded.pop("skipped_steps") == 0  # the counter version 1 files predate
    assert snapshot(loaded) == snapshot(saved["state"])
    assert target.seed == saved["seed"] == 11
    if name == "upgdw":
        AdaptiveUPGD(layout, backend="reference").load(path)
    if name == "upgd_paper":
        with pytest.raises(ValueError, match=r"variant"):
            UPGD(layout, backend="reference").load(path)


def test_seed_of_the_wrong_type_is_a_type_error():
    source, _ = _trained()
    target, _ = _trained(seed=9)
    before = snapshot(target)
    for seed in ("5", 5.0, None, [5], True):
        state_dict = source.state_dict()
        state_dict["seed"] = seed
        with pytest.raises(TypeError, match=r"seed must be an int"):
            target.load_state_dict(state_dict)
    assert_unchanged(before, snapshot(target))
