"""Unreadable, oversized, 16-bit and oddly named images: every reading path treats them alike
(embed, fit with and without a prior, eval), and the records list the images skipped."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folder import make_image_folder
from PIL import Image
from rela_train.cli import main
from rela_train.data.augment import ViewSpec
from rela_train.data.folder import EvalTransform, ImageFolder, fingerprint, list_images
from rela_train.data.images import UnreadableImage, read_rgb, to_rgb
from rela_train.data.sources import FolderSource
from rela_train.data.views import CropPlan, decode_views, load_rgb, simplejpeg
from rela_train.evaluate import evaluate_checkpoint
from rela_train.presets import get_preset
from rela_train.prior.embedding import TRANSPORT_FILE, embed
from rela_train.prior.targets import prepare_prior
from rela_train.runs import fit

import rela_kernels as rk

DECODERS = ["pil"] + (["simplejpeg"] if simplejpeg is not None else [])


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels (its data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG with its SOF0 size fields rewritten to ``width x height``."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


BAD_FILES = {
    "garbage.png": b"not a png at all",
    "cut.jpg": b"\xff\xd8\xff\xe0 truncated",
    "bomb.png": png_header(60000, 60000),  # Pillow raises DecompressionBombError
    "big.png": png_header(10000, 10000),  # Pillow only warns (DecompressionBombWarning)
    "bomb.jpg": jpeg_claiming(60000, 60000),
}


def write_bad(folder: Path, names=BAD_FILES) -> list[str]:
    for name in names:
        (folder / f"zz_{name}").write_bytes(BAD_FILES[name])
    return [f"zz_{name}" for name in names]


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_every_reading_path_raises_one_error_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"zz_{name}"
    path.write_bytes(BAD_FILES[name])
    plan = CropPlan((ViewSpec(),), size=8, seed=0, epoch=0)
    readers = [lambda: read_rgb(path), lambda: load_rgb(path, shrink_to=8)]
    readers += [lambda d=d: decode_views(path, plan, 0, d) for d in DECODERS]
    for read in readers:
        with pytest.raises(UnreadableImage) as caught:
            read()
        assert caught.value.path == str(path) and str(path) in str(caught.value)
        assert "\n" not in str(caught.value) and caught.value.reason
    if "bomb" in name or "big" in name:
        with pytest.raises(UnreadableImage, match="exceeds (the )?limit"):
            read_rgb(path) if name.endswith("png") else decode_views(path, plan, 0, DECODERS[-1])


def test_image_folder_read_reports_skips_instead_of_raising(tmp_path: Path) -> None:
    make_image_folder(tmp_path, classes=1, per_class=3, seed=0)
    write_bad(tmp_path / "class_0", ["bomb.png", "garbage.png"])
    folder = ImageFolder(tmp_path, EvalTransform(size=8, resize=8))
    results = [folder.read(i) for i in range(len(folder))]
    skipped = [(i, reason) for image, i, reason in results if image is None]
    assert [folder.samples[i].path for i, _ in skipped] == [
        "class_0/zz_bomb.png",
        "class_0/zz_garbage.png",
    ]
    assert all("cannot read image" in reason for _, reason in skipped)
    assert all(image.shape == (3, 8, 8) for image, _, reason in results if not reason)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_gray_is_scaled_not_saturated(
    tmp_path: Path, mode: str, generator: torch.Generator
) -> None:
    values = torch.randint(0, 65536, (9, 11), generator=generator).numpy()
    if mode == "I":
        image = Image.fromarray(values.astype(np.int32), mode="I")
    else:
        dtype = "<u2" if mode == "I;16" else ">u2"
        image = Image.frombytes(mode, (11, 9), values.astype(dtype).tobytes())
    assert image.mode == mode
    expected = np.rint(values / 257.0).astype(np.uint8)
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (9, 11, 3) and np.array_equal(rgb[..., 0], expected)
    # Pillow's own conversion saturates: the scaling is what makes the test pass.
    assert not np.array_equal(np.asarray(image.convert("RGB"))[..., 0], expected)
    # Every path reading a 16-bit PNG file sees the same 8-bit gray.
    path = tmp_path / "gray16.png"
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert np.array_equal(np.asarray(read_rgb(path))[..., 0], expected)
    assert np.array_equal(np.asarray(load_rgb(path))[..., 1], expected)
    folder = ImageFolder(tmp_path)
    assert np.array_equal(np.asarray(folder.load(0))[..., 2], expected)
    tensor = EvalTransform(size=9, resize=9, interpolation="nearest")(Image.open(path))
    assert 0.05 < float(tensor.mean()) < 0.95  # saturated pixels would give a mean near 1
    plan = CropPlan((ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0),), 4, 0, 0)
    views = decode_views(path, plan, 0, "pil")
    assert 0 < int(views.float().mean()) < 250


def test_non_utf8_file_names_are_listed_read_and_embedded(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_image_folder(root, classes=2, per_class=3, seed=5)
    raw = os.fsencode(root / "class_0") + b"/caf\xe9.png"
    Image.new("RGB", (12, 10), (10, 200, 30)).save(os.fsdecode(raw), format="PNG")
    bad = os.fsencode(root / "class_1") + b"/bad\xff.png"
    with open(bad, "wb") as handle:
        handle.write(b"garbage")
    samples, classes = list_images(root)
    assert len(samples) == 8 and classes == ["class_0", "class_1"]
    assert len(fingerprint(samples)) == 64
    folder = ImageFolder(root)
    index = [s.path for s in samples].index(os.fsdecode(b"class_0/caf\xe9.png"))
    assert folder.load(index).size == (12, 10)
    result = embed(root, "pixels:4", tmp_path / "store", workers=0, progress=False, log=print)
    store = rk.EmbeddingStore.open(result.store)
    assert result.skipped_rows == 1 and len(store.skipped) == 1
    (reason,) = store.skipped.values()
    assert "bad\\xff.png" in reason  # named, with the undecodable byte escaped
    json.dumps(reason, ensure_ascii=False).encode("utf-8")  # printable anywhere


def test_embed_skips_bad_images_marks_rows_and_fits_on_valid_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=5, seed=7)
    write_bad(data / "class_0", ["bomb.png", "cut.jpg"])
    write_bad(data / "class_1", ["big.png"])
    out = tmp_path / "store"
    argv = ["embed", "--data-dir", str(data), "--prior", "pixels:4", "--out", str(out)]
    argv += ["--workers", "0", "--no-progress", "--batch-size", "2", "--chunk-rows", "4"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3 unreadable images skipped" in captured.out
    assert captured.err.count("warning: skipping unreadable image") == 3
    store = rk.EmbeddingStore.open(out)
    folder = ImageFolder(data)
    skipped_paths = sorted(folder.samples[row].path for row in store.skipped)
    assert skipped_paths == ["class_0/zz_bomb.png", "class_0/zz_cut.jpg", "class_1/zz_big.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(row for row, _ in manifest["skipped"]) == sorted(store.skipped)
    assert all("zz_" in why for _, why in manifest["skipped"])
    valid = store.valid
    assert valid.sum() == 10 and not valid[list(store.skipped)].any()
    assert not np.asarray(store.array)[~valid].any()  # skipped rows hold zeros
    # The transport is the PCA whitening of the valid rows only.
    transport = rk.Transport.load(out / TRANSPORT_FILE)
    rows = np.array(store.array)
    expected = rk.fit_pca_whitening(rows[valid], transport.out_dim)
    with_zeros = rk.fit_pca_whitening(rows, transport.out_dim)
    assert torch.allclose(transport.mean, expected.mean, atol=1e-6)
    assert not torch.allclose(transport.mean, with_zeros.mean, atol=1e-3)
    # The trainer's targets of skipped rows carry weight 0.
    targets = prepare_prior(
        source=FolderSource(data, 8),
        prior=None,
        prior_store=str(out),
        run_dir=tmp_path / "run",
        dim=4,
        device=torch.device("cpu"),
        log=lambda _: None,
    )
    weights = targets.valid(torch.arange(store.n), torch.device("cpu"))
    assert weights is not None and torch.equal(weights, torch.from_numpy(valid).float())
    # A rerun finds the store complete and intact; nothing is recomputed.
    assert main(argv) == 0
    assert "13 x 48 embeddings (0 computed now, 3 unreadable images skipped)" in (
        capsys.readouterr().out
    )


def test_a_store_whose_folder_lost_a_file_says_what_to_do(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4, seed=8)
    (name,) = write_bad(data / "class_1", ["garbage.png"])
    out = tmp_path / "store"
    options = dict(workers=0, progress=False, chunk_rows=4, batch_size=2, log=lambda _: None)
    assert embed(data, "pixels:4", out, **options).skipped_rows == 1
    (data / "class_1" / name).unlink()
    with pytest.raises(ValueError) as caught:
        embed(data, "pixels:4", out, **options)
    message = str(caught.value)
    assert "changed since the store" in message and "9 images then, 8 now" in message
    assert "can stay in place" in message and "new --out directory" in message
    # Restoring the folder makes the store usable again, without recomputing anything.
    (data / "class_1" / name).write_bytes(BAD_FILES["garbage.png"])
    assert embed(data, "pixels:4", out, **options).computed_rows == 0


def _folder_config(tmp_path: Path, **changes):
    return get_preset("synthetic-test").replace(
        dataset="folder", data_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"),
        image_size=12, load_size=14, epochs=1, batch_size=4, eval_every=0, **changes,
    )  # fmt: skip


def test_fit_with_a_prior_and_eval_skip_and_list_bad_images(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "train", classes=2, per_class=8, seed=3)
    make_image_folder(tmp_path / "val", classes=2, per_class=3, seed=4)
    train_bad = write_bad(tmp_path / "train" / "class_0", ["bomb.png", "cut.jpg"])
    val_bad = write_bad(tmp_path / "val" / "class_1", ["big.png"])
    cfg = _folder_config(tmp_path, prior="pixels:6", rela_dim=4, switch="never")
    result = fit(cfg, tmp_path / "run", log=lambda _: None)
    assert result.status == "finished"
    listed = result.summary["skipped_files"]
    assert len(listed) == 3
    for name in train_bad + val_bad:
        assert sum(name in line for line in listed) == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_files"] == listed
    store = rk.EmbeddingStore.open(tmp_path / "run" / "prior")
    assert store.complete and len(store.skipped) == 2
    evaluated = evaluate_checkpoint(tmp_path / "run", probe_iterations=0, log=lambda _: None)
    assert len(evaluated["skipped_files"]) == 3
