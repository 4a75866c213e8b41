"""transferlab.data: discovery of layouts, robustness to odd folders, stratified splits, image decoding."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLORS, make_class_folders, make_image
from PIL import Image

from transferlab.data import decode as data
from transferlab.data.decode import ImageDecodeError, load_rgb
from transferlab.data.discovery import Sample, discover
from transferlab.data.images import decode_for_model, decode_samples
from transferlab.data.splits import split_per_class
from transferlab.errors import TransferlabError
from transferlab.models.preprocessing import PreprocessConfig

CFG = PreprocessConfig(input_size=32, resize_size=36, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)


def labels_of(samples):
    return sorted({s.label for s in samples})


def names_of(samples):
    return sorted(s.path.name for s in samples)


# --------------------------------------------------------------------------------------------- layouts


def test_class_folders_layout(tiny_data):
    splits = discover(tiny_data)
    assert splits.classes == ["blue", "red"]  # sorted, not creation order
    assert len(splits.train) == 12
    assert splits.val is None and splits.test is None
    assert splits.layout == "class folders"
    assert names_of(s for s in splits.train if s.label == "red") == [f"red_{i}.png" for i in range(6)]
    assert all(s.path.parent.name == s.label for s in splits.train)


def test_class_order_is_sorted_names(tmp_path):
    make_class_folders(tmp_path, per_class=2, classes=("red", "green", "blue"))
    assert discover(tmp_path).classes == ["blue", "green", "red"]


def test_train_val_layout_val_stands_for_test(tiny_split_data):
    splits = discover(tiny_split_data)
    assert splits.classes == ["blue", "red"]
    assert len(splits.train) == 16 and len(splits.test) == 6
    assert splits.val is None
    assert all(s.path.parent.parent.name == "val" for s in splits.test)
    assert all(s.path.parent.parent.name == "train" for s in splits.train)
    assert splits.layout == "train/, test/"


def test_train_validation_layout(tmp_path):
    make_class_folders(tmp_path / "train", per_class=3)
    make_class_folders(tmp_path / "validation", per_class=2, start_seed=50)
    splits = discover(tmp_path)
    assert splits.val is None
    assert len(splits.test) == 4
    assert {s.path.parent.parent.name for s in splits.test} == {"validation"}


def test_train_val_test_layout(tmp_path):
    make_class_folders(tmp_path / "train", per_class=4)
    make_class_folders(tmp_path / "val", per_class=2, start_seed=50)
    make_class_folders(tmp_path / "test", per_class=3, start_seed=90)
    splits = discover(tmp_path)
    assert len(splits.train) == 8 and len(splits.val) == 4 and len(splits.test) == 6
    assert {s.path.parent.parent.name for s in splits.val} == {"val"}
    assert {s.path.parent.parent.name for s in splits.test} == {"test"}
    assert splits.layout == "train/, val/, test/"


def test_test_dir_argument(tiny_data, tmp_path):
    test_root = make_class_folders(tmp_path / "elsewhere", per_class=2, start_seed=70)
    splits = discover(tiny_data, test_dir=test_root)
    assert len(splits.train) == 12 and len(splits.test) == 4
    assert all(test_root in s.path.parents for s in splits.test)
    assert "--test-dir" in splits.layout


def test_labels_csv(tmp_path):
    root = tmp_path / "imgs"
    make_image(root / "a.png", COLORS["red"], 1)
    make_image(root / "sub" / "b.png", COLORS["blue"], 2)
    absolute = make_image(tmp_path / "other" / "c.png", COLORS["green"], 3)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,label\na.png,zebra\nsub/b.png,ant\n{absolute},ant\n", encoding="utf-8")
    splits = discover(root, labels_csv=csv_path)
    assert splits.classes == ["ant", "zebra"]
    by_name = {s.path.name: s for s in splits.train}
    assert by_name["a.png"].path == root / "a.png" and by_name["a.png"].label == "zebra"
    assert by_name["b.png"].path == root / "sub" / "b.png"
    assert by_name["c.png"].path == absolute


def test_labels_csv_with_bom_and_extra_columns(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\ufeffid,path,label\n1,x.png,cat\n2,y.png,dog\n", encoding="utf-8")
    splits = discover(tmp_path, labels_csv=csv_path)
    assert splits.classes == ["cat", "dog"]
    assert [s.path for s in splits.train] == [tmp_path / "x.png", tmp_path / "y.png"]


# ---------------------------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(TransferlabError, match="folder not found") as err:
        discover(missing)
    assert str(missing) in str(err.value)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(TransferlabError, match="not a folder") as err:
        discover(f)
    assert str(f) in str(err.value)


def test_missing_test_dir(tiny_data, tmp_path):
    with pytest.raises(TransferlabError, match="--test-dir") as err:
        discover(tiny_data, test_dir=tmp_path / "absent")
    assert "absent" in str(err.value)


def test_single_class(tmp_path):
    make_class_folders(tmp_path, per_class=3, classes=("red",))
    with pytest.raises(TransferlabError, match=r"found 1 class \(red\).*at least two"):
        discover(tmp_path)


def test_no_class_folders(tmp_path):
    make_image(tmp_path / "loose.png", COLORS["red"], 0)
    with pytest.raises(TransferlabError, match="no class folders"):
        discover(tmp_path)


def test_class_without_images(tmp_path):
    make_class_folders(tmp_path, per_class=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(TransferlabError, match="class 'empty' has no images"):
        discover(tmp_path)


def test_class_only_in_test_split(tmp_path):
    make_class_folders(tmp_path / "train", per_class=3)
    make_class_folders(tmp_path / "test", per_class=2, classes=("red", "blue", "green"))
    with pytest.raises(TransferlabError, match="class 'green' is in the test split"):
        discover(tmp_path)


def test_class_only_in_val_split(tmp_path):
    make_class_folders(tmp_path / "train", per_class=3)
    make_class_folders(tmp_path / "val", per_class=2, classes=("red", "blue", "green"))
    make_class_folders(tmp_path / "test", per_class=2)
    with pytest.raises(TransferlabError, match="class 'green' is in the val split"):
        discover(tmp_path)


def test_labels_csv_wrong_header(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,class\na.png,cat\nb.png,dog\n", encoding="utf-8")
    with pytest.raises(TransferlabError, match="header with columns 'path' and 'label'") as err:
        discover(tmp_path, labels_csv=csv_path)
    assert str(csv_path) in str(err.value)


def test_labels_csv_empty_label(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\na.png,cat\nb.png,\n", encoding="utf-8")
    with pytest.raises(TransferlabError, match="line 3"):
        discover(tmp_path, labels_csv=csv_path)


def test_labels_csv_missing(tmp_path):
    with pytest.raises(TransferlabError, match="file not found"):
        discover(tmp_path, labels_csv=tmp_path / "nope.csv")


# ------------------------------------------------------------------------------------ odd folder contents


def test_non_images_and_hidden_entries_ignored(tiny_data):
    red = tiny_data / "red"
    (red / "README.txt").write_text("about")
    (red / ".DS_Store").write_bytes(b"\x00\x01")
    make_image(red / ".x.jpg", COLORS["red"], 99)
    make_image(red / ".hidden" / "h.png", COLORS["red"], 98)
    make_image(tiny_data / ".cache" / "c.png", COLORS["red"], 97)  # hidden top-level folder: not a class
    splits = discover(tiny_data)
    assert splits.classes == ["blue", "red"]
    assert len(splits.train) == 12
    names = names_of(splits.train)
    assert ".x.jpg" not in names and "h.png" not in names and "c.png" not in names
    assert splits.ignored == [str(red / "README.txt")]


def test_images_in_nested_subfolders(tiny_data):
    nested = make_image(tiny_data / "blue" / "a" / "b" / "deep.jpg", COLORS["blue"], 7, fmt="JPEG")
    upper = make_image(tiny_data / "red" / "UPPER.PNG", COLORS["red"], 8, fmt="PNG")
    splits = discover(tiny_data)
    assert len(splits.train) == 14
    by_path = {s.path: s.label for s in splits.train}
    assert by_path[nested] == "blue"
    assert by_path[upper] == "red"


def test_symlink_loop_in_class_folder(tiny_data):
    os.symlink(tiny_data / "red", tiny_data / "red" / "loop", target_is_directory=True)
    os.symlink(tiny_data, tiny_data / "blue" / "up", target_is_directory=True)
    splits = discover(tiny_data)
    assert len(splits.train) == 12
    assert len({s.path for s in splits.train}) == 12


# ---------------------------------------------------------------------------------------------- splitting


def make_samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"/d/{label}/{i:03d}.png"), label) for label, n in counts.items() for i in range(n)]


def test_split_is_stratified_with_expected_sizes():
    samples = make_samples({"a": 10, "b": 7, "c": 3, "d": 2})
    keep, held = split_per_class(samples, 0.2, seed=0, split_name="val")
    held_per = {c: sum(s.label == c for s in held) for c in "abcd"}
    # round(0.2 * n), at least one: 2.0 -> 2, 1.4 -> 1, 0.6 -> 1, 0.4 -> 0 -> 1
    assert held_per == {"a": 2, "b": 1, "c": 1, "d": 1}
    keep_per = {c: sum(s.label == c for s in keep) for c in "abcd"}
    assert keep_per == {"a": 8, "b": 6, "c": 2, "d": 1}


def test_split_disjoint_and_complete():
    samples = make_samples({"a": 13, "b": 9, "c": 5})
    keep, held = split_per_class(samples, 0.3, seed=3, split_name="test")
    assert not {s.path for s in keep} & {s.path for s in held}
    assert sorted(keep + held, key=lambda s: str(s.path)) == sorted(samples, key=lambda s: str(s.path))
    assert len(held) == 4 + 3 + 2  # round(3.9), round(2.7), round(1.5)


def test_split_deterministic_per_seed_and_input_order():
    samples = make_samples({"a": 20, "b": 20, "c": 20})
    _, held1 = split_per_class(samples, 0.25, seed=1, split_name="val")
    _, held1_again = split_per_class(list(reversed(samples)), 0.25, seed=1, split_name="val")
    _, held2 = split_per_class(samples, 0.25, seed=2, split_name="val")
    assert {s.path for s in held1} == {s.path for s in held1_again}
    assert {s.path for s in held1} != {s.path for s in held2}
    assert len(held1) == len(held2) == 15


def test_split_many_small_classes():
    samples = make_samples({f"c{i:03d}": 4 for i in range(100)})
    keep, held = split_per_class(samples, 0.2, seed=0, split_name="val")
    assert len(held) == 100 and len(keep) == 300
    assert labels_of(held) == labels_of(samples)
    assert labels_of(keep) == labels_of(samples)


def test_split_class_with_one_image_named():
    samples = make_samples({"plenty": 5, "lonely": 1})
    with pytest.raises(TransferlabError, match="class 'lonely' has 1 usable image"):
        split_per_class(samples, 0.2, seed=0, split_name="val")


# ---------------------------------------------------------------------------------------------- decoding


def check_rgb(path: Path, expected: tuple[int, int, int] | None = None, tol: int = 6, cfg=CFG):
    """load_rgb gives RGB; decode_for_model a CHW uint8 tensor with short side resize_size."""
    im = load_rgb(path)
    assert im.mode == "RGB"
    t = decode_for_model(path, cfg)
    assert t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
    assert min(t.shape[1:]) == cfg.resize_size
    if expected is not None:
        centre = t[:, t.shape[1] // 2, t.shape[2] // 2].tolist()
        assert all(abs(a - b) <= tol for a, b in zip(centre, expected, strict=True)), (centre, expected)
    return im, t


def solid(mode, size, color):
    return Image.new(mode, size, color)


def test_palette_png(tmp_path):
    p = tmp_path / "p.png"
    solid("RGB", (40, 30), (200, 30, 60)).convert("P", palette=Image.Palette.ADAPTIVE).save(p)
    with Image.open(p) as check:
        assert check.mode == "P"
    _, t = check_rgb(p, (200, 30, 60), tol=3)
    assert t.shape == (3, 36, 48)


def test_palette_with_transparency_becomes_white(tmp_path):
    im = Image.new("P", (20, 20), 0)
    im.putpalette([10, 20, 30] + [250, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 10, 20))  # left half red, right half index 0 (transparent)
    p = tmp_path / "pt.png"
    im.save(p, transparency=0)
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" in check.info
    rgb = load_rgb(p)
    assert rgb.getpixel((2, 10)) == (250, 0, 0)
    assert rgb.getpixel((17, 10)) == (255, 255, 255)


def test_greyscale_l(tmp_path):
    p = tmp_path / "l.png"
    solid("L", (30, 50), 90).save(p)
    im, t = check_rgb(p, (90, 90, 90), tol=1)
    assert t.shape == (3, 60, 36)


def test_greyscale_la_transparent_is_white(tmp_path):
    im = Image.new("LA", (20, 20), (60, 255))
    im.paste((60, 0), (10, 0, 20, 20))
    p = tmp_path / "la.png"
    im.save(p)
    rgb = load_rgb(p)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((3, 3)) == (60, 60, 60)
    assert rgb.getpixel((15, 3)) == (255, 255, 255)


def test_rgba_transparent_pixels_white(tmp_path):
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # transparent black: must not become black
    im.paste((10, 200, 10, 255), (0, 0, 20, 40))
    im.paste((200, 0, 0, 128), (20, 0, 40, 20))  # half transparent red over white
    p = tmp_path / "rgba.png"
    im.save(p)
    rgb = load_rgb(p)
    assert rgb.getpixel((5, 5)) == (10, 200, 10)
    assert rgb.getpixel((35, 35)) == (255, 255, 255)
    r, g, b = rgb.getpixel((30, 5))
    assert abs(r - 227) <= 2 and abs(g - 127) <= 2 and abs(b - 127) <= 2
    check_rgb(p)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    solid("RGB", (50, 40), (30, 90, 200)).convert("CMYK").save(p, quality=95)
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    check_rgb(p, (30, 90, 200), tol=10)


@pytest.mark.parametrize("value, expected", [(32768, 128), (65535, 255), (0, 0), (16384, 64)])
def test_16bit_greyscale_png(tmp_path, value, expected):
    p = tmp_path / "g16.png"
    Image.fromarray(np.full((30, 40), value, dtype=np.uint16)).save(p)
    with Image.open(p) as check:
        assert check.mode.startswith("I")
    rgb = load_rgb(p)
    r, g, b = rgb.getpixel((5, 5))
    assert r == g == b
    assert abs(r - expected) <= 1, (value, r)
    check_rgb(p, (expected,) * 3, tol=1)


def test_exif_rotated_jpeg(tmp_path):
    im = Image.new("RGB", (60, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 30, 20))  # red on the stored left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    rgb = load_rgb(p)
    assert rgb.size == (20, 60)
    top, bottom = rgb.getpixel((10, 5)), rgb.getpixel((10, 55))
    assert top[0] > 200 and top[2] < 60  # stored left is displayed on top after a clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60
    _, t = check_rgb(p)
    assert t.shape == (3, 108, 36)


def test_animated_gif_first_frame(tmp_path):
    frames = [solid("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(p) as check:
        assert check.n_frames == 3
    check_rgb(p, (255, 0, 0), tol=2)


@pytest.mark.parametrize("fmt, ext", [("BMP", ".bmp"), ("TIFF", ".tiff"), ("WEBP", ".webp"), ("PNG", ".png")])
def test_other_formats(tmp_path, fmt, ext):
    p = tmp_path / f"img{ext}"
    solid("RGB", (64, 48), (120, 60, 200)).save(p, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    _, t = check_rgb(p, (120, 60, 200), tol=2)
    assert t.shape == (3, 36, 48)


def test_one_pixel_image(tmp_path):
    p = tmp_path / "one.png"
    solid("RGB", (1, 1), (7, 77, 177)).save(p)
    _, t = check_rgb(p, (7, 77, 177), tol=0)
    assert t.shape == (3, 36, 36)


def test_large_jpeg_draft_keeps_short_side(tmp_path):
    p = make_image(tmp_path / "big.jpg", COLORS["green"], 0, size=(900, 400), fmt="JPEG")
    _, t = check_rgb(p)
    assert t.shape == (3, 36, 81)


@pytest.mark.parametrize("size, shape", [((2000, 10), (3, 36, 108)), ((10, 2000), (3, 108, 36))])
def test_extreme_aspect_ratio_capped(tmp_path, size, shape):
    p = tmp_path / "strip.png"
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[..., 1] = 200
    Image.fromarray(arr).save(p)
    t = decode_for_model(p, CFG)
    assert tuple(t.shape) == shape
    assert max(t.shape[1:]) == data.MAX_ASPECT * CFG.resize_size
    assert abs(int(t[1].float().mean()) - 200) <= 1


def test_aspect_cap_keeps_centre(tmp_path):
    arr = np.zeros((10, 2000, 3), dtype=np.uint8)
    arr[:, :900] = (255, 0, 0)
    arr[:, 900:1100] = (0, 255, 0)
    arr[:, 1100:] = (0, 0, 255)
    p = tmp_path / "centre.png"
    Image.fromarray(arr).save(p)
    t = decode_for_model(p, CFG)
    # kept window is the middle 30 source pixels: all green
    assert t[1].min() > 200 and t[0].max() < 60 and t[2].max() < 60


# ------------------------------------------------------------------------------------------------ bad files


def good_jpeg_bytes(size=(120, 90)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_zero_byte_jpg(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_rgb(p)


def test_text_saved_as_jpg(tmp_path):
    p = tmp_path / "text.jpg"
    p.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageDecodeError):
        decode_for_model(p, CFG)


@pytest.mark.parametrize("min_side", [None, 36])
def test_truncated_jpeg_is_error_not_grey(tmp_path, min_side):
    raw = good_jpeg_bytes()
    p = tmp_path / "trunc.jpg"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_rgb(p, min_side=min_side)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_rgb(tmp_path / "gone.png")


def png_with_declared_size(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    assert raw[12:16] == b"IHDR"
    chunk = bytearray(raw[12:29])  # type + 13 data bytes
    chunk[4:12] = struct.pack(">II", width, height)
    raw[12:29] = chunk
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(chunk)) & 0xFFFFFFFF)
    return bytes(raw)


def test_huge_declared_size(tmp_path):
    p = tmp_path / "huge.png"
    p.write_bytes(png_with_declared_size(10_000, 10_000))  # 1e8 > MAX_IMAGE_PIXELS (6.4e7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError, match="too large"):
            load_rgb(p)


def test_far_too_huge_declared_size(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_with_declared_size(30_000, 30_000))  # beyond Pillow's own hard limit
    with pytest.raises(ImageDecodeError):
        load_rgb(p)


def test_max_image_pixels_limit(tmp_path, monkeypatch):
    p = make_image(tmp_path / "ok.png", COLORS["red"], 0, size=(48, 40))
    assert load_rgb(p).size == (48, 40)
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 48 * 40 - 1)
    with pytest.raises(ImageDecodeError, match=r"too large \(48x40"):
        load_rgb(p)


def test_decode_samples_lenient_and_strict(tmp_path):
    good = [make_image(tmp_path / f"g{i}.png", COLORS["blue"], i) for i in range(3)]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.jpg"
    raw = good_jpeg_bytes()
    trunc.write_bytes(raw[: len(raw) // 2])
    samples = [Sample(good[0], "blue"), Sample(empty, "red"), Sample(good[1], "blue"), Sample(trunc, "red"),
               Sample(good[2], "blue")]
    out = decode_samples(samples, CFG, strict=False, workers=2, progress=False)
    assert [s.path for s in out.samples] == good  # order kept
    assert len(out.images) == 3
    assert all(t.shape == (3, 36, 43) and t.dtype == torch.uint8 for t in out.images)
    assert [d["path"] for d in out.skipped] == [str(empty), str(trunc)]
    assert [d["label"] for d in out.skipped] == ["red", "red"]
    assert "not an image" in out.skipped[0]["reason"]
    assert "truncated" in out.skipped[1]["reason"]

    with pytest.raises(TransferlabError) as err:
        decode_samples(samples, CFG, strict=True, workers=2, progress=False)
    assert str(empty) in str(err.value)


def test_decode_matches_between_threads_and_single(tiny_data):
    samples = discover(tiny_data).train
    many = decode_samples(samples, CFG, workers=4, progress=False)
    one = decode_samples(samples, CFG, workers=1, progress=False)
    assert not many.skipped and len(many.images) == 12
    assert all(torch.equal(a, b) for a, b in zip(many.images, one.images, strict=True))


def test_iter_decoded_keeps_order_and_bounds_lookahead(monkeypatch, tmp_path):
    import threading

    from transferlab.data import images as data_module
    from transferlab.data.decode import ImageDecodeError
    from transferlab.data.images import iter_decoded
    from transferlab.models.preprocessing import PreprocessConfig

    started: list[int] = []
    lock = threading.Lock()

    def fake_decode(path, cfg):
        with lock:
            started.append(int(path))
        if int(path) == 7:
            raise ImageDecodeError("cannot decode: broken")
        return torch.full((1,), int(path))

    monkeypatch.setattr(data_module, "decode_for_model", fake_decode)
    cfg = PreprocessConfig(8, 8, "bilinear", (0.5,) * 3, (0.5,) * 3)
    consumed = []
    for i, (tensor, error) in enumerate(iter_decoded([str(i) for i in range(40)], cfg, workers=2, lookahead=5)):
        with lock:
            assert len(started) <= i + 6  # never more than `lookahead` ahead of the consumer
        consumed.append(("error", error) if tensor is None else int(tensor))
    assert consumed == [i if i != 7 else ("error", "cannot decode: broken") for i in range(40)]
