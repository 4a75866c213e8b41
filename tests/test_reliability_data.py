"""Reliability of data loading: a corpus of bad and odd inputs through `transferlab train` and `predict`.

One training run (lenient), one --strict run and one predict call cover the whole corpus: every bad file is
skipped with its reason in data_report.json (or, with --strict, stops the run with a one-line error naming it)
and gets an error line from predict; every valid-but-odd image is used, upright and in its true colours.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLORS, make_image
from PIL import Image

from transferlab.cli import main
from transferlab.data import decode as data
from transferlab.data.decode import ImageDecodeError, load_rgb
from transferlab.data.discovery import Sample, discover
from transferlab.data.images import decode_for_model, decode_samples
from transferlab.errors import TransferlabError
from transferlab.models.preprocessing import PreprocessConfig

TINY_ARGS = ["--backbone", "timm/test_efficientnet", "--weights", "none", "--image-size", "64", "--batch-size", "8",
             "--precision", "fp32", "--strategy", "freeze", "--epochs", "1"]
CFG = PreprocessConfig(input_size=32, resize_size=36, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
TOP, BOTTOM = (230, 40, 40), (40, 60, 220)  # how every odd image looks once displayed: red above blue
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


# ------------------------------------------------------------------------------------------- the corpus


def two_tone(size=(40, 60), top=TOP, bottom=BOTTOM, mode="RGB") -> Image.Image:
    im = Image.new(mode, size, top)
    im.paste(bottom, (0, size[1] // 2, size[0], size[1]))
    return im


def png_with_declared_size(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR (CRC fixed up) declares ``width`` x ``height``: a decompression bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def gif_with_frame_extent(width: int, height: int) -> bytes:
    """A 1x1 GIF whose first frame claims ``width`` x ``height``: Pillow grows the image to the frame."""
    buf = io.BytesIO()
    Image.new("P", (1, 1), 0).save(buf, "GIF")
    raw = bytearray(buf.getvalue())
    at = raw.index(b",", 13)  # image descriptor: ',' x0 y0 w h (little-endian)
    raw[at + 5:at + 9] = struct.pack("<HH", width, height)
    return bytes(raw)


def _odd_images(root: Path, outside: Path) -> dict[Path, tuple]:
    """Valid but unusual images; each displays as TOP above BOTTOM (expected colours per file)."""
    odd: dict[Path, tuple] = {}
    red, blue = root / "red", root / "blue"

    p = red / "cmyk.jpg"
    two_tone().convert("CMYK").save(p, quality=95)
    odd[p] = (TOP, BOTTOM, "CMYK")

    p = red / "grey16.png"
    arr = np.full((60, 40), 65535, dtype=np.uint16)
    arr[30:] = 16384
    Image.fromarray(arr).save(p)
    odd[p] = (WHITE, (64, 64, 64), "I;16")

    p = red / "palette.png"
    two_tone().convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(p)
    odd[p] = (TOP, BOTTOM, "P")

    p = red / "exif.jpg"  # stored on its side; EXIF orientation 6 = turn 90 degrees clockwise to display
    exif = Image.Exif()
    exif[0x0112] = 6
    two_tone().transpose(Image.Transpose.ROTATE_90).save(p, exif=exif.tobytes(), quality=95)
    odd[p] = (TOP, BOTTOM, "RGB")

    p = outside / "target.png"  # a symlinked file is an ordinary image
    two_tone().save(p)
    os.symlink(p, red / "linked.png")
    odd[red / "linked.png"] = (TOP, BOTTOM, "RGB")

    p = blue / "anim.gif"  # the first frame counts
    frames = [two_tone(), Image.new("RGB", (40, 60), (0, 255, 0)), Image.new("RGB", (40, 60), (255, 255, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    odd[p] = (TOP, BOTTOM, "P")

    p = blue / "alpha.png"  # fully transparent black below: composited on white, never black
    im = Image.new("RGBA", (40, 60), (0, 0, 0, 0))
    im.paste((*TOP, 255), (0, 0, 40, 30))
    im.save(p)
    odd[p] = (TOP, WHITE, "RGBA")

    p = blue / "grey.png"
    two_tone(top=200, bottom=50, mode="L").save(p)
    odd[p] = ((200,) * 3, (50,) * 3, "L")

    p = blue / "one.png"
    Image.new("RGB", (1, 1), BOTTOM).save(p)
    odd[p] = (BOTTOM, BOTTOM, "RGB")

    p = blue / "ünï cödé 名前 photo.png"
    two_tone().save(p)
    odd[p] = (TOP, BOTTOM, "RGB")
    return odd


def _bad_files(root: Path) -> dict[Path, str]:
    """Files that must be skipped (train) or answered with an error line (predict): path -> reason regex."""
    red, blue = root / "red", root / "blue"
    bad = {}
    raw = make_image(red / "truncated.jpg", COLORS["red"], 5, size=(120, 90), fmt="JPEG").read_bytes()
    (red / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    bad[red / "truncated.jpg"] = "truncated"
    (red / "empty.jpg").write_bytes(b"")
    bad[red / "empty.jpg"] = "not an image"
    (blue / "text.jpg").write_text("this is not an image\n" * 20, encoding="utf-8")
    bad[blue / "text.jpg"] = "not an image"
    (blue / "bomb.png").write_bytes(png_with_declared_size(10_000, 10_000))  # over Pillow's warning limit
    bad[blue / "bomb.png"] = r"too large \(10000x10000"
    (red / "bigbomb.png").write_bytes(png_with_declared_size(30_000, 30_000))  # over Pillow's error limit
    bad[red / "bigbomb.png"] = r"too large \(30000x30000"
    os.symlink(root / "nowhere.png", red / "dangling.jpg")
    bad[red / "dangling.jpg"] = "file not found .*dangling symlink"
    os.symlink("selfloop.png", red / "selfloop.png")  # a symlink to itself
    bad[red / "selfloop.png"] = "cannot decode: Too many levels of symbolic links"
    make_image(blue / "locked.png", COLORS["blue"], 6)  # readable on disk; reading is denied by deny_reading()
    bad[blue / "locked.png"] = "permission denied"
    return bad


@contextlib.contextmanager
def deny_reading(path: Path):
    """Opening ``path`` raises PermissionError, as for a chmod 000 file (CI runs as root, where chmod can't)."""
    real_open = builtins.open
    denied = os.path.abspath(path)

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(file)) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", fake_open)
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """root/{red,blue}/: 5 plain images per class, the odd images, the bad files, and things to ignore."""
    base = tmp_path_factory.mktemp("corpus")
    root, outside = base / "data", base / "outside"
    outside.mkdir()
    for name in ("red", "blue"):
        for i in range(5):
            make_image(root / name / f"{name}_{i}.png", COLORS[name], seed=i + (100 if name == "blue" else 0))
    odd = _odd_images(root, outside)
    bad = _bad_files(root)
    make_image(root / "red" / ".hidden.png", COLORS["red"], 7)  # hidden: neither used nor reported
    make_image(root / "red" / ".thumbs" / "t.png", COLORS["red"], 8)
    make_image(root / ".cache" / "c.png", COLORS["red"], 9)
    (root / "red" / "notes.txt").write_text("not an image", encoding="utf-8")
    os.symlink(root, root / "loop", target_is_directory=True)  # top level: must not become class 'loop'
    os.symlink(root, root / "red" / "loop", target_is_directory=True)
    os.symlink(root.parent, root / "blue" / "up", target_is_directory=True)
    return {"root": root, "odd": odd, "bad": bad, "locked": root / "blue" / "locked.png",
            "n_good": 10 + len(odd)}


def _cli(argv: list[str]) -> tuple[int, str, str, list]:
    """main(argv) with stdout/stderr captured and every warning recorded."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue(), caught


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """`transferlab train` over the whole corpus (lenient), then `predict` over its folder."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    root = corpus["root"]
    with deny_reading(corpus["locked"]):
        train = _cli(["-q", "train", str(root), "--out", str(run_dir), *TINY_ARGS])
        assert train[0] == 0, train
        predict = _cli(["-q", "predict", str(run_dir), str(root), str(root / "red" / "dangling.jpg"),
                        str(root / "red" / "selfloop.png")])
    report = json.loads((run_dir / "data_report.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in predict[1].splitlines()]
    return {"run_dir": run_dir, "train": train, "report": report, "predict": predict, "rows": rows}


@pytest.fixture(autouse=True)
def _no_truncated_loading():
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ------------------------------------------------------------------------------------------- train, lenient


def test_train_skips_every_bad_file_with_its_reason(corpus, trained):
    skipped = {Path(e["path"]): e for e in trained["report"]["skipped"]}
    assert set(skipped) == set(corpus["bad"])
    for path, reason in corpus["bad"].items():
        entry = skipped[path]
        assert re.search(reason, entry["reason"]), (path.name, entry["reason"])
        assert str(path) not in entry["reason"]  # the path is the entry's other field, not repeated
        assert entry["label"] == path.parent.name


def test_train_uses_every_valid_image_and_ignores_hidden_and_loops(corpus, trained):
    report, root = trained["report"], corpus["root"]
    assert report["classes"] == ["blue", "red"]  # no class 'loop'
    counts = report["counts"]
    used = {c: counts["train"][c] + counts["test"][c] for c in ("blue", "red")}
    assert used == {"red": 5 + 5, "blue": 5 + 5}  # the plain and the odd images, nothing hidden, nothing twice
    assert sum(used.values()) == corpus["n_good"]
    assert sorted(report["ignored_non_images"]) == [str(root / "loop"), str(root / "red" / "notes.txt")]
    rc, stdout, stderr, caught = trained["train"]
    assert "Traceback" not in stderr
    assert "skipped 8 unreadable file(s)" in stderr
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# ------------------------------------------------------------------------------------------- train, strict


def test_train_strict_stops_with_one_line_naming_the_file(corpus, tmp_path):
    with deny_reading(corpus["locked"]):
        rc, stdout, stderr, _ = _cli(["-q", "train", str(corpus["root"]), "--out", str(tmp_path / "run"),
                                      *TINY_ARGS, "--strict"])
    assert rc == 2 and stdout == ""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("transferlab: error: ")]
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], stderr
    named = [p for p in corpus["bad"] if f"error: {p}: " in errors[0]]
    assert len(named) == 1, errors[0]
    assert re.search(corpus["bad"][named[0]], errors[0]) and errors[0].endswith("(--strict)")
    assert not (tmp_path / "run" / "config.json").exists()


def test_strict_error_for_each_bad_file(corpus):
    """--strict stops on whichever bad file comes first; each kind of bad file gives its own clear line."""
    with deny_reading(corpus["locked"]):
        for path, reason in corpus["bad"].items():
            with pytest.raises(TransferlabError) as err:
                decode_samples([Sample(path, "red")], CFG, strict=True, workers=1, progress=False)
            message = str(err.value)
            assert message.startswith(f"{path}: ") and message.endswith("(--strict)"), message
            assert "\n" not in message and re.search(reason, message), message


# ------------------------------------------------------------------------------------------------- predict


def test_predict_error_line_per_bad_file_and_carries_on(corpus, trained):
    rc, stdout, stderr, caught = trained["predict"]
    rows = trained["rows"]
    assert rc == 1, stderr
    assert "Traceback" not in stderr
    by_path = {Path(r["path"]): r for r in rows}
    assert len(by_path) == len(rows) == len(corpus["bad"]) + corpus["n_good"]  # once each, loops not followed
    for path, reason in corpus["bad"].items():
        assert re.search(reason, by_path[path]["error"]), (path.name, by_path[path])
    good = [p for p in by_path if p not in corpus["bad"]]
    assert set(corpus["odd"]) <= set(good)
    for path in good:
        assert "error" not in by_path[path] and by_path[path]["label"] in ("blue", "red"), by_path[path]
    assert not any(part.startswith(".") for p in by_path for part in p.relative_to(corpus["root"]).parts)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# -------------------------------------------------------------------------------- odd images, as displayed


def test_odd_images_upright_and_true_colours(corpus):
    for path, (top, bottom, mode) in corpus["odd"].items():
        with Image.open(path) as raw:
            assert raw.mode == mode, (path.name, raw.mode)  # the corpus really holds the odd mode
        t = decode_for_model(path, CFG)
        assert t.dtype == torch.uint8 and t.shape[0] == 3 and min(t.shape[1:]) == CFG.resize_size
        if path.name != "one.png":
            assert tuple(t.shape[1:]) == (54, 36), (path.name, t.shape)  # 40x60 displayed: portrait
        h = t.shape[1]
        seen_top = t[:, : h // 4].float().mean((1, 2))
        seen_bottom = t[:, -(h // 4):].float().mean((1, 2))
        for seen, want in ((seen_top, top), (seen_bottom, bottom)):
            assert torch.allclose(seen, torch.tensor(want, dtype=torch.float32), atol=12), (path.name, seen, want)


# --------------------------------------------------------------------------------- discovery and symlinks


def test_symlinks_to_the_data_folder_or_above_are_not_classes(tmp_path):
    root = tmp_path / "data"
    for name in ("red", "blue"):
        make_image(root / name / "a.png", COLORS[name], 0)
    elsewhere = make_image(tmp_path / "elsewhere" / "green" / "g.png", COLORS["green"], 1).parent
    os.symlink(root, root / "loop", target_is_directory=True)
    os.symlink(tmp_path, root / "up", target_is_directory=True)
    os.symlink(elsewhere, root / "green", target_is_directory=True)  # a symlinked class folder still counts
    splits = discover(root)
    assert splits.classes == ["blue", "green", "red"]
    assert sorted(splits.ignored) == [str(root / "loop"), str(root / "up")]
    assert [s.path for s in splits.train if s.label == "green"] == [root / "green" / "g.png"]


def test_symlink_loop_in_train_layout(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "test"):
        for name in ("red", "blue"):
            make_image(root / split / name / "a.png", COLORS[name], 0)
    os.symlink(root, root / "train" / "again", target_is_directory=True)
    splits = discover(root)
    assert splits.classes == ["blue", "red"] and len(splits.train) == 2
    assert splits.ignored == [str(root / "train" / "again")]


def test_dangling_symlink_reason(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    with pytest.raises(ImageDecodeError, match=r"file not found \(dangling symlink to .*gone\.jpg\)"):
        load_rgb(tmp_path / "link.jpg")


# ----------------------------------------------------------------------------------- decompression bombs


def test_bomb_refused_before_pillow_warns_and_filters_untouched(tmp_path):
    bombs = []
    for i, side in enumerate((10_000, 30_000)):
        p = tmp_path / f"bomb{i}.png"
        p.write_bytes(png_with_declared_size(side, side))
        bombs.append(p)
    filters, limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for p in bombs:
            with pytest.raises(ImageDecodeError, match="too large"):
                load_rgb(p)
        inner = list(warnings.filters)
        out = decode_samples([Sample(p, "x") for p in bombs * 4], CFG, workers=2, progress=False)
        assert list(warnings.filters) == inner  # decoding threads never touch the warning filters
    assert [w.category.__name__ for w in caught] == []
    assert len(out.skipped) == 8 and all("too large" in s["reason"] for s in out.skipped)
    assert list(warnings.filters) == filters and Image.MAX_IMAGE_PIXELS == limit


def test_gif_frame_larger_than_its_screen_is_refused_without_warning(tmp_path):
    p = tmp_path / "frame.gif"
    p.write_bytes(gif_with_frame_extent(10_000, 10_000))  # Pillow's GIF reader would warn while opening
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageDecodeError, match=r"too large \(10000x10000"):
            load_rgb(p)
    assert [w.category.__name__ for w in caught] == []


def test_pillow_bomb_check_is_a_decode_error(tmp_path, monkeypatch):
    """Should Pillow's own check fire (here: our limit raised above Pillow's), it is an ImageDecodeError."""
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 10**12)
    warns, fails = tmp_path / "warns.gif", tmp_path / "fails.gif"
    warns.write_bytes(gif_with_frame_extent(10_000, 10_000))  # Pillow warns (> 89 MP)
    fails.write_bytes(gif_with_frame_extent(30_000, 30_000))  # Pillow raises (> 179 MP)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user's filters turn warnings into exceptions
        with pytest.raises(ImageDecodeError, match="^decompression bomb: Image size"):
            load_rgb(warns)
    with pytest.raises(ImageDecodeError, match="^decompression bomb: Image size"):
        load_rgb(fails)


def test_big_jpeg_decodes_in_draft_mode(tmp_path, monkeypatch):
    """A 6000x4000 photo (24 MP) decodes at 1/8 scale: 750x500 pixels are ever held, not 24 million."""
    p = tmp_path / "big.jpg"
    two_tone(size=(6000, 4000)).save(p, quality=80)
    sizes = []
    real = data._to_rgb

    def spy(im):
        sizes.append(im.size)
        return real(im)

    monkeypatch.setattr(data, "_to_rgb", spy)
    t = decode_for_model(p, CFG)
    assert tuple(t.shape) == (3, 36, 54)
    assert sizes == [(750, 500)]  # the largest JPEG reduction that keeps the short side >= 36
    h = t.shape[1]
    assert torch.allclose(t[:, : h // 4].float().mean((1, 2)), torch.tensor(TOP, dtype=torch.float32), atol=12)
    assert torch.allclose(t[:, -(h // 4):].float().mean((1, 2)), torch.tensor(BOTTOM, dtype=torch.float32),
                          atol=12)
