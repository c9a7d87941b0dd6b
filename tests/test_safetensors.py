"""Our safetensors reader and writer: round trips, agreement with the `safetensors` package, and a
CheckpointError naming file, tensor and numbers for every malformed file."""
import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from weights.safetensors import DTYPES, CheckpointError, SafetensorsFile, write_safetensors


def every_dtype():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5))
    return {
        "f64": x, "f32": x.astype(np.float32), "f16": x.astype(np.float16),
        "bf16": x.astype(ml_dtypes.bfloat16),
        "fp8": ("F8_E4M3", rng.integers(0, 256, (7, 3), dtype=np.uint8)),
        "i64": rng.integers(-2**40, 2**40, (4,)), "i32": rng.integers(-9, 9, (2, 2), dtype=np.int32),
        "i16": np.arange(-3, 3, dtype=np.int16), "i8": np.arange(-3, 3, dtype=np.int8),
        "u8": np.arange(250, 256, dtype=np.uint8), "bool": np.array([True, False, True]),
        "scalar": np.float32(2.5).reshape(()), "empty": np.zeros((0, 4), np.float32),
    }


def test_round_trip_every_dtype(tmp_path):
    tensors = every_dtype()
    write_safetensors(tmp_path / "a.safetensors", tensors, metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert sorted(f.names()) == sorted(tensors) and "f32" in f and "nope" not in f
    tags = {"f64": "F64", "f32": "F32", "f16": "F16", "bf16": "BF16", "fp8": "F8_E4M3", "i64": "I64",
            "i32": "I32", "i16": "I16", "i8": "I8", "u8": "U8", "bool": "BOOL", "scalar": "F32", "empty": "F32"}
    for name, want in tensors.items():
        want = want[1] if isinstance(want, tuple) else want
        got = f.get(name)
        assert f.info(name) == (tags[name], want.shape)
        assert got.dtype == want.dtype == DTYPES[tags[name]] and got.shape == want.shape
        assert np.array_equal(got, want), name  # bit-exact, bf16 and fp8 bits included
        assert not got.flags.writeable


def test_get_is_a_view_on_the_mapped_file(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"w": np.ones((64, 64), np.float32)})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert np.shares_memory(f.get("w"), f._data)


def test_layout_is_aligned_and_deterministic(tmp_path):
    tensors = every_dtype()
    write_safetensors(tmp_path / "a.safetensors", tensors)
    write_safetensors(tmp_path / "b.safetensors", dict(reversed(tensors.items())))
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert raw == (tmp_path / "b.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    for name, entry in header.items():
        assert entry["data_offsets"][0] % DTYPES[entry["dtype"]].itemsize == 0, name


def test_agrees_with_the_safetensors_package(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"f32": rng.standard_normal((4, 6)).astype(np.float32),
               "f16": rng.standard_normal(9).astype(np.float16),
               "i64": rng.integers(-2**50, 2**50, (3, 1, 2)), "u8": rng.integers(0, 256, (5, 5), dtype=np.uint8)}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = safetensors.numpy.load_file(tmp_path / "ours.safetensors")
    safetensors.numpy.save_file(tensors, tmp_path / "theirs.safetensors")
    ours = SafetensorsFile(tmp_path / "theirs.safetensors")
    for name, want in tensors.items():
        assert np.array_equal(theirs[name], want) and theirs[name].dtype == want.dtype
        assert np.array_equal(ours.get(name), want) and ours.get(name).dtype == want.dtype


def test_writer_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(CheckpointError, match=r"'c'.*complex64"):
        write_safetensors(tmp_path / "a.safetensors", {"c": np.zeros(2, np.complex64)})
    with pytest.raises(CheckpointError, match=r"'w' tagged F8_E4M3.*float32"):
        write_safetensors(tmp_path / "a.safetensors", {"w": ("F8_E4M3", np.zeros(2, np.float32))})


# --- malformed files ---------------------------------------------------------------------------

def raw_file(path, header, data=b"", header_bytes=None):
    """A file with an arbitrary header (dict, or raw bytes) and data section."""
    h = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(len(h).to_bytes(8, "little") + h + data)
    return path


def error(path):
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    return message


def test_file_shorter_than_the_header_length(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    assert "file has 3 bytes" in error(p)


def test_missing_file(tmp_path):
    assert "cannot open" in error(tmp_path / "absent.safetensors")


def test_header_length_past_end(tmp_path):
    p = tmp_path / "a.safetensors"
    p.write_bytes((1000).to_bytes(8, "little") + b"{}" + b"\0" * 10)
    assert "header length 1000 runs past the end of the file (20 bytes)" in error(p)


def test_bad_json(tmp_path):
    assert "not valid JSON" in error(raw_file(tmp_path / "a.safetensors", None, header_bytes=b'{"w": [1, 2'))
    assert "not valid JSON" in error(raw_file(tmp_path / "b.safetensors", None, header_bytes=b"\xff\xfe"))
    assert "JSON list, not an object" in error(raw_file(tmp_path / "c.safetensors", [1, 2]))
    assert "'w' has a header entry that is a JSON int" in error(raw_file(tmp_path / "d.safetensors", {"w": 3}))


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_offsets_past_the_data_section(tmp_path):
    p = raw_file(tmp_path / "a.safetensors", {"model.norm.weight": entry(shape=(4,), offsets=(0, 16))}, b"\0" * 8)
    assert "tensor 'model.norm.weight' data_offsets [0, 16] run past the data section (8 bytes)" in error(p)


def test_truncated_data(tmp_path):
    p = tmp_path / "a.safetensors"
    write_safetensors(p, {"w": np.zeros((10, 10), np.float32)})
    p.write_bytes(p.read_bytes()[:-4])
    assert "tensor 'w' data_offsets [0, 400] run past the data section (396 bytes)" in error(p)


def test_byte_count_mismatch(tmp_path):
    p = raw_file(tmp_path / "a.safetensors", {"w": entry("F32", (3,), (0, 8))}, b"\0" * 16)
    assert "tensor 'w' data_offsets [0, 8] hold 8 bytes, but F32 [3] needs 12" in error(p)
    p = raw_file(tmp_path / "b.safetensors", {"w": entry("BF16", (2, 3), (0, 8))}, b"\0" * 16)
    assert "BF16 [2, 3] needs 12" in error(p)


def test_overlapping_tensors(tmp_path):
    p = raw_file(tmp_path / "a.safetensors", {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, b"\0" * 16)
    assert "tensors 'a' data_offsets [0, 8] and 'b' [4, 12] overlap" in error(p)


def test_unknown_dtype(tmp_path):
    p = raw_file(tmp_path / "a.safetensors", {"w": entry("F4", (2,), (0, 1))}, b"\0" * 8)
    assert "tensor 'w' has unknown dtype 'F4'" in error(p)


def test_bad_shape_and_offsets(tmp_path):
    data = b"\0" * 16
    assert "shape [2, -1] is not a list of non-negative integers" in error(
        raw_file(tmp_path / "a.safetensors", {"w": entry(shape=(2, -1))}, data))
    assert "shape [2.0] is not" in error(raw_file(tmp_path / "b.safetensors", {"w": entry(shape=(2.0,))}, data))
    assert "data_offsets [0, 8, 9] is not a pair" in error(
        raw_file(tmp_path / "c.safetensors", {"w": entry(offsets=(0, 8, 9))}, data))
    assert "data_offsets [8, 0] are not 0 <= begin <= end" in error(
        raw_file(tmp_path / "d.safetensors", {"w": entry(offsets=(8, 0))}, data))
    assert "__metadata__ is not an object of strings" in error(
        raw_file(tmp_path / "e.safetensors", {"__metadata__": {"n": 1}}, data))


def test_unknown_tensor_name(tmp_path):
    p = tmp_path / "a.safetensors"
    write_safetensors(p, {"w": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=r"a\.safetensors: no tensor 'lm_head.weight'"):
        SafetensorsFile(p).get("lm_head.weight")
