"""Run-length encoding in the Kaggle/Severstal convention: known answers, round trips, malformed csv rows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from defectscope.data.rle import (
    RLEError,
    RLERecord,
    masks_to_records,
    parse_rle,
    read_rle_csv,
    records_to_masks,
    rle_decode,
    rle_encode,
    write_rle_csv,
)


# Known answers written from the definition: pixel (r, c) of an H x W mask has number c * H + r + 1.
def test_known_answer_small_mask():
    mask = np.array([[0, 1], [1, 1], [0, 0]])  # column-major: 0 1 0 | 1 1 0
    assert rle_encode(mask) == "2 1 4 2"
    np.testing.assert_array_equal(rle_decode("2 1 4 2", (3, 2)), mask)


def test_known_answer_run_continues_across_columns():
    mask = np.zeros((3, 2), dtype=bool)
    mask[2, 0] = mask[0, 1] = True  # pixels 3 and 4: one run
    assert rle_encode(mask) == "3 2"


def test_known_answer_single_pixel_and_full_and_empty():
    m = np.zeros((4, 5), dtype=np.uint8)
    m[1, 2] = 1  # 2 * 4 + 1 + 1 = 10
    assert rle_encode(m) == "10 1"
    assert rle_encode(np.ones((4, 5))) == "1 20"
    assert rle_encode(np.zeros((4, 5))) == ""
    assert rle_decode("", (4, 5)).sum() == 0


def test_known_answer_severstal_size_last_pixel():
    m = np.zeros((256, 1600), dtype=np.uint8)
    m[255, 1599] = 1
    m[0, 0] = 1
    assert rle_encode(m) == f"1 1 {256 * 1600} 1"


def test_decoder_accepts_touching_runs_encoder_merges_them():
    m = rle_decode("1 2 3 2", (2, 2))
    assert m.all()
    assert rle_encode(m) == "1 4"


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((2, 2, 2)))


@settings(max_examples=150, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 24), st.integers(1, 24))))
def test_round_trip_random_masks(mask):
    enc = rle_encode(mask)
    dec = rle_decode(enc, mask.shape)
    np.testing.assert_array_equal(dec.astype(bool), mask)
    runs = parse_rle(enc)
    assert runs[:, 1].sum() == mask.sum()
    assert rle_encode(dec) == enc


@settings(max_examples=40, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12))))
def test_csv_round_trip_random_masks(tmp_path_factory, masks):
    path = tmp_path_factory.mktemp("rle") / "masks.csv"
    write_rle_csv(path, masks_to_records("img 1.jpg", masks))
    records = read_rle_csv(path, masks.shape[1:])
    assert [r.class_id for r in records] == list(range(1, masks.shape[0] + 1))
    np.testing.assert_array_equal(records_to_masks(records, "img 1.jpg", masks.shape[1:], masks.shape[0]).astype(bool), masks)


def _csv_with_bad_row(tmp_path, encoded: str):
    path = tmp_path / "train.csv"
    path.write_text("ImageId,ClassId,EncodedPixels\n"
                    "a.jpg,1,1 3\n"
                    "a.jpg,2,\n"
                    f"b.jpg,1,{encoded}\n")
    return path


@pytest.mark.parametrize("encoded, message", [
    ("1 3 7", "odd number of values"),
    ("1 x", "'x' is not a positive integer"),
    ("1 -2", "'-2' is not a positive integer"),
    ("1.5 2", "'1.5' is not a positive integer"),
    ("0 2", "1-indexed"),
    ("3 0", "length 0"),
    ("10 2 1 2", "not sorted"),
    ("1 5 3 2", "overlaps run 2"),
    ("1 2 11 5", "past the image's 12 pixels"),
])
def test_malformed_rows_name_the_row(tmp_path, encoded, message):
    path = _csv_with_bad_row(tmp_path, encoded)
    with pytest.raises(RLEError, match="row 3") as err:
        read_rle_csv(path, (3, 4))
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_run_past_image_is_only_checked_with_a_size(tmp_path):
    path = _csv_with_bad_row(tmp_path, "1 2 11 5")
    assert len(read_rle_csv(path)) == 3  # syntax is fine without a size
    with pytest.raises(RLEError, match="no image size known"):
        read_rle_csv(path, {"a.jpg": (3, 4)})


def test_bad_header_class_and_duplicates(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("ImageId,Class,EncodedPixels\na.jpg,1,1 1\n")
    with pytest.raises(RLEError, match="header"):
        read_rle_csv(p)
    p.write_text("ImageId,ClassId,EncodedPixels\na.jpg,0,1 1\n")
    with pytest.raises(RLEError, match="row 1.*ClassId '0'"):
        read_rle_csv(p)
    p.write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,1 1\na.jpg,1,3 1\n")
    with pytest.raises(RLEError, match="row 2.*duplicate"):
        read_rle_csv(p)
    p.write_text("ImageId,ClassId,EncodedPixels\na.jpg,1\n")
    with pytest.raises(RLEError, match="row 1.*3 columns"):
        read_rle_csv(p)


def test_write_is_atomic_on_bad_record(tmp_path):
    p = tmp_path / "out.csv"
    write_rle_csv(p, [RLERecord("a.jpg", 1, "1 2")])
    before = p.read_text()
    with pytest.raises(ValueError, match="ClassId 0"):
        write_rle_csv(p, [RLERecord("a.jpg", 1, ""), RLERecord("b.jpg", 0, "1 1")])
    assert p.read_text() == before
    assert [q.name for q in tmp_path.iterdir()] == ["out.csv"]
