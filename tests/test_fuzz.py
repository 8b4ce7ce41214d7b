"""Fuzzing the image and mask decoding paths (hypothesis, bounded): any bytes either decode
to a valid array or raise DataError naming the file; nothing else escapes."""

import io
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from adtr.data.images import DataError, decode_for_model, image_size, read_image, read_mask


def _encoded(fmt: str, mode: str) -> bytes:
    rng = np.random.default_rng(0)
    shape = (13, 17) if mode in ("L", "I;16") else (13, 17, 3)
    dtype = np.uint16 if mode == "I;16" else np.uint8
    arr = rng.integers(0, 255, shape).astype(dtype)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_encoded("PNG", "RGB"), _encoded("PNG", "L"), _encoded("PNG", "I;16"), _encoded("JPEG", "RGB"),
         _encoded("BMP", "RGB"), _encoded("TIFF", "RGB")]  # fmt: skip


@st.composite
def mutated(draw):
    """A valid encoded image with bytes flipped, cut or inserted: what a camera or disk may produce."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[i:]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def _check(decode, data: bytes) -> None:
    try:
        out = decode(data)
    except DataError as e:
        assert "fuzz.png" in str(e)
        return
    assert out.dtype in (np.uint8, np.bool_)
    assert out.ndim in (2, 3) and out.shape[0] > 0 and out.shape[1] > 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.binary(max_size=256)))
def test_image_decoding_never_crashes(data):
    _check(lambda d: read_image("fuzz.png", d), data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mask_decoding_never_crashes(data):
    _check(lambda d: read_mask("fuzz.png", data=d), data)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    import adtr.data.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(p)
    with pytest.raises(DataError, match="big.png.*exceeds the limit"):
        read_image(p)


def _tiff_with_rational_strip_offsets() -> bytes:
    """A valid TIFF whose StripOffsets tag (273) is retyped RATIONAL: Pillow 13's decoder raises
    TypeError on it (found by the fuzzing above)."""
    data = bytearray(_encoded("TIFF", "L"))
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == 273:
            struct.pack_into("<H", data, entry + 2, 5)
            return bytes(data)
    raise AssertionError("no StripOffsets tag in the TIFF")


@pytest.mark.parametrize("decode", [read_image, read_mask])
def test_a_decoder_failure_of_another_type_is_a_data_error_naming_the_file(decode, tmp_path):
    data = _tiff_with_rational_strip_offsets()
    try:
        Image.open(io.BytesIO(data)).load()
    except TypeError:
        pass  # Pillow itself: not one of the exceptions a decoder documents
    except (OSError, ValueError, SyntaxError):
        pytest.skip("this Pillow reports the file with a documented exception type")
    else:
        pytest.skip("this Pillow decodes the file")
    with pytest.raises(DataError, match=r"bad\.tif: corrupt image: the decoder failed \(TypeError"):
        decode("bad.tif", data=data)
    path = tmp_path / "bad.tif"
    path.write_bytes(data)
    with pytest.raises(DataError, match="bad.tif"):
        decode(path)


class _Broken:
    """Stands for a PIL image whose decoding fails with an undocumented exception type."""

    width = height = 4

    def load(self):
        raise IndexError("tuple index out of range")

    def __enter__(self):
        raise KeyError("a tag")

    def __exit__(self, *exc):
        return False


def test_any_decoder_exception_is_a_data_error_naming_the_file_whatever_pillow_raises(monkeypatch, tmp_path):
    """Whatever type Pillow raises, in decoding or in a header read, the reader names the file."""
    path = tmp_path / "odd.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    monkeypatch.setattr(Image, "open", lambda *a, **k: _Broken())
    for decode in (read_image, read_mask, lambda p: decode_for_model(p, (32, 32))):
        with pytest.raises(DataError, match=r"odd\.png: corrupt image: the decoder failed \(IndexError"):
            decode(path)
    with pytest.raises(DataError, match=r"odd\.png: corrupt image header \(KeyError"):
        image_size(path)


def test_a_memory_error_is_not_reported_as_a_corrupt_file(monkeypatch, tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)

    def out_of_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(Image, "open", out_of_memory)
    with pytest.raises(MemoryError):
        read_image(path)


def test_bytes_of_the_wrong_type_are_the_callers_error_not_a_corrupt_file():
    with pytest.raises(TypeError):
        read_image("x.png", data="not bytes")  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_decoding_for_the_model_never_crashes(data):
    """The predict path (decode and resize at once) under the same fuzzing as read_image."""

    def decode(d: bytes) -> np.ndarray:
        tensor, _ = decode_for_model("fuzz.png", (32, 48), data=d)
        assert tensor.shape == (3, 32, 48)
        return tensor.permute(1, 2, 0).numpy().astype(np.uint8)

    _check(decode, data)
