"""Image loading: DICOM grayscale pipeline against hand-computed pixels, rasters, resizing."""

import io
import pickle

import numpy as np
import pytest
from fixtures_medical import gradient, write_dicom, write_raster
from PIL import Image

from input_pipeline import images, worker_pool
from input_pipeline.images import ImageDecodeError, ImageJob, load_image


def test_dicom_16_bit_without_window_spans_full_range(tmp_path):
    stored = np.array([[0, 1000], [30000, 65535]], dtype=np.uint16)
    loaded = load_image(write_dicom(tmp_path / "a.dcm", stored))
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, stored)


def test_dicom_12_bit_stored_masks_high_bits_and_stretches(tmp_path):
    # High nibble garbage in 16-bit storage: only the low 12 bits are the value.
    stored = np.array([[0, 0xF000 | 1365], [4095, 0x1000 | 2730]], dtype=np.uint16)
    loaded = load_image(write_dicom(tmp_path / "a.dcm", stored, bits_stored=12))
    np.testing.assert_array_equal(loaded, [[0, 21845], [65535, 43690]])  # 1/3, 2/3 of 65535


def test_dicom_monochrome1_is_inverted(tmp_path):
    stored = np.array([[0, 51, 255]], dtype=np.uint8)
    loaded = load_image(write_dicom(tmp_path / "a.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(loaded, [[65535, 52428, 0]])  # 1 - [0, 0.2, 1]


def test_dicom_rescale_then_linear_window(tmp_path):
    stored = np.array([[0, 100, 200, 300, 400]], dtype=np.uint16)
    # Rescaled: [-100, 100, 300, 500, 700]. LINEAR window c=300, w=401:
    # y = (x - 299.5) / 400 + 0.5, clipped -> [0, 0.00125, 0.50125, 1, 1].
    path = write_dicom(tmp_path / "a.dcm", stored, slope=2, intercept=-100, window=(300, 401))
    np.testing.assert_array_equal(load_image(path), [[0, 82, 32849, 65535, 65535]])


def test_dicom_window_on_monochrome1_and_linear_exact(tmp_path):
    stored = np.array([[100, 150, 200]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored, window=(150, 100),
                       voi_function="LINEAR_EXACT", photometric="MONOCHROME1")
    # (x - 150) / 100 + 0.5 -> [0, 0.5, 1], inverted -> [1, 0.5, 0].
    np.testing.assert_array_equal(load_image(path), [[65535, 32768, 0]])


def test_dicom_signed_with_intercept(tmp_path):
    stored = np.array([[-1000, 0, 1000]], dtype=np.int16)
    path = write_dicom(tmp_path / "a.dcm", stored, slope=1, intercept=1024)
    np.testing.assert_array_equal(load_image(path), [[0, 32768, 65535]])  # 0, 0.5, 1


def test_dicom_voi_lut_sequence(tmp_path):
    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored, voi_lut=[0, 1000, 30000, 65535],
                       window=(1, 1))  # The LUT wins over the window.
    np.testing.assert_array_equal(load_image(path), [[0, 1000, 30000, 65535]])


def test_dicom_rle_compressed_equals_uncompressed(tmp_path):
    stored = gradient(12, 9, dtype=np.uint16)
    plain = load_image(write_dicom(tmp_path / "plain.dcm", stored))
    rle = load_image(write_dicom(tmp_path / "rle.dcm", stored, rle=True))
    np.testing.assert_array_equal(rle, plain)


@pytest.mark.parametrize("syntax, name", [("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
                                          ("1.2.840.10008.1.2.4.70", "JPEG Lossless")])
def test_undecodable_dicom_lists_the_missing_decoders_and_how_to_install(tmp_path, syntax,
                                                                         name):
    from pydicom.pixels import get_decoder

    decoder = get_decoder(syntax)
    if decoder.is_available:
        pytest.skip(f"a {name} decoder is installed here")
    path = write_dicom(tmp_path / "c.dcm", np.zeros((4, 4), np.uint16), transfer_syntax=syntax)
    with pytest.raises(ImageDecodeError, match=rf"c\.dcm: cannot decode pixel data \({name}"):
        load_image(path)
    message = images.encode_job(ImageJob(path, None)).detail  # As the build report has it.
    assert "\n" not in message
    # Every plugin pydicom knows for the syntax, each with the packages it lacks.
    assert decoder.missing_dependencies  # E.g. "gdcm - requires gdcm>=3.0.10".
    for missing in decoder.missing_dependencies:
        assert missing in message
    assert message.endswith("; install the decoders with: pip install -e '.[dicom-codecs]'")


def test_corrupt_data_with_an_installed_decoder_gets_no_install_hint(tmp_path):
    path = write_dicom(tmp_path / "j.dcm", np.zeros((4, 4), np.uint8),
                       transfer_syntax="1.2.840.10008.1.2.4.50")  # JPEG baseline: Pillow.
    with pytest.raises(ImageDecodeError, match=r"j\.dcm: cannot decode pixel data \(JPEG "
                                               r"Baseline.*pillow: ") as raised:
        load_image(path)
    assert "dicom-codecs" not in str(raised.value)


@pytest.mark.parametrize("content", [b"", b"garbage" * 40, b"\x00" * 128 + b"DICM" + b"\x01"])
def test_corrupt_dicom_raises_decode_error(tmp_path, content):
    path = tmp_path / "bad.dcm"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match="bad.dcm"):
        load_image(path)


def test_dicom_recognised_by_magic_without_suffix(tmp_path):
    stored = np.array([[0, 65535]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored)
    renamed = tmp_path / "image_without_suffix"
    renamed.write_bytes(open(path, "rb").read())
    np.testing.assert_array_equal(load_image(renamed), stored)


def test_png_8_bit_and_16_bit(tmp_path):
    eight = gradient(10, 7)
    sixteen = gradient(10, 7, dtype=np.uint16)
    np.testing.assert_array_equal(load_image(write_raster(tmp_path / "a.png", eight)),
                                  eight.astype(np.uint16) * 257)
    np.testing.assert_array_equal(load_image(write_raster(tmp_path / "b.png", sixteen)),
                                  sixteen)


def test_rgb_png_becomes_luminance(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # Pure red: ITU-R 601 luma 0.299 * 255 = 76.
    np.testing.assert_array_equal(load_image(write_raster(tmp_path / "a.png", rgb)),
                                  np.full((2, 3), 76 * 257))


def test_jpeg_is_8_bit_scaled_and_draft_decodes_smaller(tmp_path):
    flat = np.full((16, 24), 100, dtype=np.uint8)
    loaded = load_image(write_raster(tmp_path / "flat.jpg", flat, quality=100))
    assert loaded.dtype == np.uint16 and loaded.shape == (16, 24)
    np.testing.assert_array_equal(loaded, 100 * 257)
    big = write_raster(tmp_path / "big.jpg", gradient(400, 200), quality=90)
    assert load_image(big).shape == (400, 200)
    assert load_image(big, max_size=64).shape == (100, 50)  # DCT scale 1/4 >= 64.


@pytest.mark.parametrize("content", [b"", b"not an image", b"\xff\xd8\xff\xe0 truncated"])
def test_unreadable_raster_raises_decode_error(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError, match="bad.jpg: not a readable image"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="nothing.png: file not found"):
        load_image(tmp_path / "nothing.png")


def test_resize_max_side_keeps_aspect_and_never_enlarges():
    image = np.full((100, 50), 40000, dtype=np.uint16)
    small = images.resize_max_side(image, 40)
    assert small.shape == (40, 20) and small.dtype == np.uint16
    np.testing.assert_array_equal(small, 40000)
    wide = images.resize_max_side(gradient(30, 90, dtype=np.uint16), 45)
    assert wide.shape == (15, 45)
    assert images.resize_max_side(image, 512) is image
    assert images.resize_max_side(image, None) is image


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_encode_png_round_trips(dtype):
    image = gradient(9, 11, dtype=dtype)
    for level in (1, 6):
        decoded = Image.open(io.BytesIO(images.encode_png(image, compress_level=level)))
        assert decoded.mode == ("L" if dtype == np.uint8 else "I;16")
        np.testing.assert_array_equal(np.asarray(decoded), image)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        images.encode_png(image.astype(np.float32))


def test_decode_png16_reads_what_encode_png_writes():
    image = gradient(5, 8, dtype=np.uint16)
    decoded = images.decode_png16(images.encode_png(image))
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, image)
    with pytest.raises(ValueError, match="expected a 16-bit grayscale PNG, got PNG mode L"):
        images.decode_png16(images.encode_png(gradient(5, 8)))


def test_one_line_keeps_a_multi_line_message_whole():
    error = RuntimeError("Unable to decode because:\n\tgdcm - requires gdcm\n\n\tpylibjpeg - "
                         "requires pylibjpeg\nlast")
    assert images.one_line(error) == ("RuntimeError: Unable to decode because: gdcm - requires "
                                      "gdcm; pylibjpeg - requires pylibjpeg; last")
    assert images.one_line(ValueError()) == "ValueError"


def test_worker_protocol_turns_bad_files_into_reasons(tmp_path):
    good = write_raster(tmp_path / "good.png", gradient(80, 40))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"nope")
    jobs = [ImageJob(good, 20), ImageJob(str(tmp_path / "gone.png"), 20),
            ImageJob(str(corrupt), None)]
    source, sink = io.BytesIO(), io.BytesIO()
    pickle.dump([jobs[:1], jobs[1:]], source)
    source.seek(0)
    worker_pool.serve("input_pipeline.images:encode_job", source, sink)
    sink.seek(0)
    first, second = pickle.load(sink), pickle.load(sink)
    assert np.asarray(Image.open(io.BytesIO(first[0].png))).shape == (20, 10)
    assert [(r.png, r.reason) for r in second] == [(None, "missing_image"),
                                                  (None, "unreadable_image")]
    assert "corrupt.png" in second[1].detail
