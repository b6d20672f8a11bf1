"""Loader-side views: crop plans, draft-mode decoding, the persistent folder loader, and the
photometric half of the augmentation that runs on the device afterwards."""

from __future__ import annotations

import hashlib
import multiprocessing
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from rela_train.config import TrainConfig
from rela_train.data import views as views_module
from rela_train.data.augment import (
    BYOL_VIEWS,
    RELA_VIEWS,
    Augmenter,
    PhotometricParams,
    ViewParams,
    ViewSpec,
    apply_photometric,
    apply_view,
    crop_resize_flip,
    normalize,
    sample_crop_boxes,
    sample_photometric,
    sample_view,
)
from rela_train.data.jpeg_folder import make_jpeg_folder, structured_image
from rela_train.data.sources import FolderSource, TensorSource, build_sources
from rela_train.data.views import CropPlan, decode_views, draft_scale, load_rgb, stable_seed

HAVE_SIMPLEJPEG = views_module.simplejpeg is not None
DECODERS = ["pil", "simplejpeg"] if HAVE_SIMPLEJPEG else ["pil"]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_jpeg_folder(tmp_path_factory.mktemp("small"), classes=3, per_class=6, seed=3)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Big enough for 1/8 draft scaling of 16-32 px views.
    root = tmp_path_factory.mktemp("big")
    return make_jpeg_folder(root, classes=1, per_class=5, size_range=(500, 1300), seed=5)


def _reference_views(path: Path, plan: CropPlan, index: int) -> torch.Tensor:
    """Plain Pillow: full decode, crop each box, resize, mirror."""
    with Image.open(path) as image:
        full = image.convert("RGB")
    boxes, flips = plan.draw(index, full.height, full.width)
    out = []
    for (left, top, w, h), flip in zip(boxes.tolist(), flips.tolist(), strict=True):
        crop = full.crop((int(left), int(top), int(left + w), int(top + h)))
        pixels = np.asarray(crop.resize((plan.size, plan.size), Image.Resampling.BILINEAR))
        out.append(pixels[:, ::-1] if flip else pixels)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean()) / 255.0


def _all_views(source: FolderSource, batches: list[list[int]], plan: CropPlan) -> dict:
    out = {}
    for batch in source.batches([torch.tensor(b) for b in batches], plan):
        assert batch.images is None and batch.views.dtype == torch.uint8
        for row, index in enumerate(batch.indices.tolist()):
            out[index] = batch.views[row]
    return out


# ----------------------------------------------------------------------------------------------
# Crop plans
# ----------------------------------------------------------------------------------------------


def test_stable_seed_is_blake2b_of_the_parts() -> None:
    parts = (12345, 7, 999999)
    digest = hashlib.blake2b(b"12345,7,999999", digest_size=8).digest()
    assert stable_seed(*parts) == int.from_bytes(digest, "little") >> 1
    assert stable_seed(1, 2, 3) == 1517167407554927345  # the same in every process
    assert 0 <= stable_seed(-1, 2**40) < 2**63


@pytest.mark.parametrize("shape", [(97, 131), (300, 40), (64, 64)])
def test_crop_boxes_follow_the_spec(shape: tuple[int, int]) -> None:
    height, width = shape
    spec = ViewSpec(crop_scale=(0.2, 0.7), crop_ratio=(0.6, 1.5))
    plan = CropPlan((spec, BYOL_VIEWS[0]), size=16, seed=1, epoch=0)
    area = height * width
    fallbacks = 0
    for index in range(300):
        boxes, flips = plan.draw(index, height, width)
        assert boxes.shape == (2, 4) and flips.shape == (2,) and flips.dtype == torch.bool
        for box, view in zip(boxes.tolist(), plan.specs, strict=True):
            left, top, w, h = box
            assert all(float(v).is_integer() for v in box)
            assert left >= 0 and top >= 0 and w >= 1 and h >= 1
            assert left + w <= width and top + h <= height
            # Whole-pixel rounding moves each side by at most half a pixel.
            lo, hi = view.crop_scale
            r0, r1 = view.crop_ratio
            in_scale = (w - 0.5) * (h - 0.5) <= hi * area and (w + 0.5) * (h + 0.5) >= lo * area
            in_ratio = (w - 0.5) / (h + 0.5) <= r1 and (w + 0.5) / (h - 0.5) >= r0
            if not (in_scale and in_ratio):
                # The documented fallback: the largest centered crop with the ratio clamped.
                fallbacks += 1
                assert w == width or h == height
                assert left == (width - w) // 2 and top == (height - h) // 2
    assert fallbacks < 60  # a fallback needs 10 misses in a row


def test_flips_follow_flip_p() -> None:
    specs = (ViewSpec(flip_p=0.3), ViewSpec(flip_p=0.0), ViewSpec(flip_p=1.0))
    plan = CropPlan(specs, size=8, seed=0, epoch=2)
    flips = torch.stack([plan.draw(i, 50, 60)[1] for i in range(3000)]).double()
    rate = flips.mean(dim=0)
    assert abs(float(rate[0]) - 0.3) < 0.04
    assert float(rate[1]) == 0.0 and float(rate[2]) == 1.0


def test_plan_depends_only_on_seed_epoch_and_index() -> None:
    plan = CropPlan(BYOL_VIEWS, size=16, seed=4, epoch=1)
    again = CropPlan(list(BYOL_VIEWS), size=16, seed=4, epoch=1)
    a, fa = plan.draw(7, 90, 120)
    b, fb = again.draw(7, 90, 120)
    assert torch.equal(a, b) and torch.equal(fa, fb)
    other_epoch = CropPlan(BYOL_VIEWS, size=16, seed=4, epoch=2).draw(7, 90, 120)[0]
    other_index = plan.draw(8, 90, 120)[0]
    assert not torch.equal(a, other_epoch) and not torch.equal(a, other_index)
    # The sampler behind it is augment's, fed from the sample's own generator.
    g = torch.Generator().manual_seed(stable_seed(4, 1, 7))
    first = sample_crop_boxes(g, 1, 90, 120, BYOL_VIEWS[0].crop_scale, BYOL_VIEWS[0].crop_ratio)
    assert torch.equal(first[0], a[0])


def test_draft_scale_never_upsamples_more() -> None:
    boxes = torch.tensor([[0.0, 0.0, 400.0, 260.0], [5.0, 5.0, 300.0, 500.0]])
    assert draft_scale(boxes, 32) == 8  # 260 / 8 >= 32
    assert draft_scale(boxes, 40) == 4  # 260 / 8 < 40 <= 260 / 4
    assert draft_scale(boxes, 200) == 1
    assert draft_scale(boxes, 1000) == 1  # already upsampled: no extra shrink


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 40, 96, 224])
def test_draft_decode_is_close_to_full_decode(
    big_folder: Path, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    scales = []
    original = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, requested):
        result = original(self, mode, requested)
        scales.append(self.decoderconfig[0] if result else 1)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    plan = CropPlan(BYOL_VIEWS, size=size, seed=0, epoch=0)
    for index, path in enumerate(sorted(big_folder.rglob("*.jpg"))):
        views = decode_views(path, plan, index, decoder="pil")
        assert views.shape == (2, 3, size, size) and views.dtype == torch.uint8
        assert _mad(views, _reference_views(path, plan, index)) < 3 / 255
    if size <= 40:
        assert 8 in scales  # big DCT-domain downscales were exercised
    assert all(s in (1, 2, 4, 8) for s in scales)


@pytest.mark.skipif(not HAVE_SIMPLEJPEG, reason="simplejpeg is not installed")
@pytest.mark.parametrize("size", [16, 64, 224])
def test_simplejpeg_agrees_with_pillow(big_folder: Path, small_folder: Path, size: int) -> None:
    plan = CropPlan(RELA_VIEWS, size=size, seed=2, epoch=3)
    paths = sorted(big_folder.rglob("*.jpg")) + sorted(small_folder.rglob("*.jpg"))[:4]
    for index, path in enumerate(paths):
        fast = decode_views(path, plan, index, decoder="simplejpeg")
        slow = decode_views(path, plan, index, decoder="pil")
        assert fast.shape == slow.shape
        assert float((fast.float() - slow.float()).abs().max()) <= 2


def test_simplejpeg_missing(monkeypatch: pytest.MonkeyPatch, small_folder: Path) -> None:
    monkeypatch.setattr(views_module, "simplejpeg", None)
    path = next(small_folder.rglob("*.jpg"))
    plan = CropPlan(BYOL_VIEWS, size=8, seed=0, epoch=0)
    with pytest.raises(ValueError, match="simplejpeg"):
        decode_views(path, plan, 0, decoder="simplejpeg")
    assert torch.equal(decode_views(path, plan, 0), decode_views(path, plan, 0, decoder="pil"))


@pytest.mark.parametrize("decoder", DECODERS)
def test_any_mode_and_format_becomes_rgb(tmp_path: Path, decoder: str) -> None:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(structured_image(rng, 90, 70))
    files = {
        "gray.jpg": rgb.convert("L"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "rgba.png": rgb.convert("RGBA"),
        "palette.png": rgb.convert("P"),
        "plain.webp": rgb,
    }
    plan = CropPlan(BYOL_VIEWS, size=12, seed=1, epoch=0)
    for index, (name, image) in enumerate(files.items()):
        image.save(tmp_path / name)
        views = decode_views(tmp_path / name, plan, index, decoder=decoder)
        assert views.shape == (2, 3, 12, 12)
        assert _mad(views, _reference_views(tmp_path / name, plan, index)) < 3 / 255


@pytest.mark.parametrize("decoder", DECODERS)
def test_unreadable_file_is_a_value_error_naming_it(tmp_path: Path, decoder: str) -> None:
    root = make_jpeg_folder(tmp_path, classes=1, per_class=0, corrupt=1)
    broken = next(root.rglob("zz_corrupt_*.jpg"))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 not really")
    plan = CropPlan(BYOL_VIEWS, size=8, seed=0, epoch=0)
    for path in (broken, garbage):
        with pytest.raises(ValueError, match=path.name):
            decode_views(path, plan, 0, decoder=decoder)
    with pytest.raises(ValueError, match=garbage.name):
        load_rgb(garbage, shrink_to=8)


def test_make_jpeg_folder(tmp_path: Path) -> None:
    root = make_jpeg_folder(tmp_path / "d", classes=2, per_class=3, size_range=(30, 50), corrupt=1)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 7 and {p.parent.name for p in files} == {"class_0", "class_1"}
    sizes = set()
    for path in files:
        if path.name.startswith("zz_corrupt"):
            continue
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert 30 <= image.width <= 50 and 30 <= image.height <= 50
            sizes.add(image.size)
            pixels = np.asarray(image, dtype=np.float32)
        # Spatial structure: neighbours differ by about 1.13 std in independent noise.
        step = np.abs(np.diff(pixels, axis=1)).mean()
        assert step < 0.5 * pixels.std()
    assert len(sizes) > 1


# ----------------------------------------------------------------------------------------------
# The folder source
# ----------------------------------------------------------------------------------------------


def test_views_do_not_depend_on_batching_or_workers(small_folder: Path) -> None:
    plan = CropPlan(BYOL_VIEWS, size=24, seed=9, epoch=1)
    serial = FolderSource(small_folder, 32, workers=0, decoder="pil")
    a = _all_views(serial, [[0, 1, 2, 3], [4, 5, 6], list(range(7, 18))], plan)
    b = _all_views(
        serial, [[17, 3, 11], [0], [5, 2, 9, 1, 16, 8, 4, 7, 6, 10, 12, 13, 14, 15]], plan
    )
    parallel = FolderSource(small_folder, 32, workers=2, decoder="pil", prefetch=2)
    try:
        c = _all_views(parallel, [[i] for i in range(18)], plan)
    finally:
        parallel.close()
    assert sorted(a) == sorted(b) == sorted(c) == list(range(18))
    for index in range(18):
        assert torch.equal(a[index], b[index]) and torch.equal(a[index], c[index])
    path = small_folder / serial.folder.samples[5].path
    assert torch.equal(a[5], decode_views(path, plan, 5, decoder="pil"))
    later = _all_views(serial, [[5]], CropPlan(BYOL_VIEWS, size=24, seed=9, epoch=2))
    assert not torch.equal(later[5], a[5])


def test_a_subset_plans_by_source_position(small_folder: Path) -> None:
    full = FolderSource(small_folder, 32)
    part = full.subset(6, seed=1)
    plan = CropPlan(RELA_VIEWS, size=16, seed=0, epoch=0)
    got = _all_views(part, [list(range(6))], plan)
    for position in range(6):
        path = small_folder / full.folder.samples[int(part._indices[position])].path
        assert torch.equal(got[position], decode_views(path, plan, position, part.decoder))
    assert (
        part.labels.tolist() == [full.labels[int(i)].item() for i in part._indices]
        and part.decoder == full.decoder
    )


def test_persistent_workers_survive_an_abandoned_stream(small_folder: Path) -> None:
    plan = CropPlan(BYOL_VIEWS, size=16, seed=0, epoch=0)
    expected = _all_views(FolderSource(small_folder, 20), [list(range(18))], plan)
    source = FolderSource(small_folder, 20, workers=2, prefetch=2)
    try:
        everything = [torch.tensor([i, i + 1]) for i in range(0, 18, 2)]
        first = source.batches(everything, plan)
        next(first)  # abandoned with batches still in flight
        workers = {p.pid for p in multiprocessing.active_children()}
        assert len(workers) >= 2
        second = source.batches([torch.tensor([17, 2, 9]), torch.tensor([4])], plan)
        got = {}
        for batch in second:
            for row, index in enumerate(batch.indices.tolist()):
                got[index] = batch.views[row]
        assert sorted(got) == [2, 4, 9, 17]
        assert all(torch.equal(got[i], expected[i]) for i in got)
        with pytest.raises(RuntimeError, match="replaced"):
            next(first)
        # The same worker processes serve later passes, evaluation included.
        again = _all_views(source, [list(range(18))], plan)
        assert all(torch.equal(again[i], expected[i]) for i in range(18))
        evaluated = sum(int(ix.shape[0]) for _, ix in source.eval_batches(16, 5))
        assert evaluated == 18
        assert workers <= {p.pid for p in multiprocessing.active_children()}
    finally:
        source.close()
    assert not workers & {p.pid for p in multiprocessing.active_children()}
    # Closed sources start new workers when used again.
    try:
        assert len(_all_views(source, [[0, 1]], plan)) == 2
    finally:
        source.close()


def test_corrupt_images_are_skipped_with_a_plan(tmp_path: Path) -> None:
    root = make_jpeg_folder(tmp_path / "d", classes=2, per_class=3, corrupt=2)
    messages: list[str] = []
    source = FolderSource(root, 20, warn=messages.append)
    corrupt = {i for i, s in enumerate(source.folder.samples) if "zz_corrupt" in s.path}
    assert len(corrupt) == 2
    plan = CropPlan(BYOL_VIEWS, size=12, seed=0, epoch=0)
    batches = [torch.arange(0, 4), torch.arange(4, 8)]
    seen = [batch.indices.tolist() for batch in source.batches(batches, plan)]
    assert sorted(i for b in seen for i in b) == sorted(set(range(8)) - corrupt)
    assert source.skipped == 2 and len(messages) == 2
    assert all("zz_corrupt" in m and m.startswith("warning: skipping") for m in messages)
    list(source.batches(batches, plan))  # counted again, warned once
    list(source.batches(batches))  # without a plan too
    assert source.skipped == 6 and len(messages) == 2
    assert sum(int(ix.shape[0]) for _, ix in source.eval_batches(16, 3)) == 6
    assert source.skipped == 6  # evaluation skips without counting


def test_pin_memory(small_folder: Path) -> None:
    plan = CropPlan(BYOL_VIEWS, size=8, seed=0, epoch=0)
    source = FolderSource(small_folder, 12, pin_memory=True)
    (batch,) = source.batches([torch.arange(4)], plan)
    (plain,) = source.batches([torch.arange(4)])
    if torch.cuda.is_available():
        assert source.pin_memory and batch.views.is_pinned() and plain.images.is_pinned()
    else:
        # Without CUDA the flag is ignored: nothing to pin for.
        assert source.pin_memory is False and source._get_loader().pin_memory is False
        assert batch.views.shape == (4, 2, 3, 8, 8) and plain.images.shape == (4, 3, 12, 12)


def test_eval_batches_shrink_jpegs_on_load(big_folder: Path) -> None:
    source = FolderSource(big_folder, 40)
    (images, indices) = next(source.eval_batches(32, 8))
    assert images.shape == (5, 3, 32, 32) and indices.tolist() == list(range(5))
    for row, sample in enumerate(source.folder.samples):
        with Image.open(big_folder / sample.path) as image:
            full = image.convert("RGB")
        scale = 40 / min(full.size)
        new = (max(40, round(full.width * scale)), max(40, round(full.height * scale)))
        full = full.resize(new, Image.Resampling.BILINEAR)
        left, top = (new[0] - 40) // 2 + 4, (new[1] - 40) // 2 + 4
        ref = torch.from_numpy(np.asarray(full.crop((left, top, left + 32, top + 32))).copy())
        ref = normalize(ref.permute(2, 0, 1)[None].float() / 255, source.mean, source.std)
        std = torch.tensor(source.std).view(1, 3, 1, 1)
        assert float(((images[row : row + 1] - ref) * std).abs().mean()) < 3 / 255


def test_tensor_source_ignores_the_plan() -> None:
    images = torch.randint(0, 256, (6, 3, 10, 10), dtype=torch.uint8)
    source = TensorSource("t", images, torch.zeros(6, dtype=torch.int64), ["a"], "fp", (0,), (1,))
    plan = CropPlan(BYOL_VIEWS, size=8, seed=0, epoch=0)
    (batch,) = source.batches([torch.tensor([1, 3])], plan)
    assert batch.views is None and torch.equal(batch.images, images[[1, 3]])
    source.close()


def test_build_sources_passes_pin_memory_decoder_and_prefetch(small_folder: Path) -> None:
    config = TrainConfig(
        dataset="folder", data_dir=str(small_folder), val_dir=str(small_folder), image_size=16,
        load_size=20, workers=0, train_subset=5, decoder="pil", prefetch=3,
    )  # fmt: skip
    train, val = build_sources(config, pin_memory=True)
    assert train.decoder == val.decoder == "pil" and train.n == 5
    assert train.prefetch == val.prefetch == 3
    assert train._pin_requested and val._pin_requested
    train, _ = build_sources(config.replace(decoder="auto"))
    assert train.decoder == ("simplejpeg" if HAVE_SIMPLEJPEG else "pil")
    assert not train._pin_requested


def test_bad_arguments_name_themselves(small_folder: Path) -> None:
    path = next(small_folder.rglob("*.jpg"))
    plan = CropPlan(BYOL_VIEWS, size=8, seed=0, epoch=0)
    with pytest.raises(ValueError, match="decoder"):
        decode_views(path, plan, 0, decoder="turbo")
    with pytest.raises(ValueError, match="decoder"):
        FolderSource(small_folder, 16, decoder="turbo")
    with pytest.raises(ValueError, match="prefetch"):
        FolderSource(small_folder, 16, prefetch=0)
    for size in (0, -3, 2.5):
        with pytest.raises(ValueError, match="size"):
            CropPlan(BYOL_VIEWS, size=size, seed=0, epoch=0)
    with pytest.raises(ValueError, match="specs"):
        CropPlan((), size=8, seed=0, epoch=0)


# ----------------------------------------------------------------------------------------------
# The photometric half
# ----------------------------------------------------------------------------------------------


def test_view_draws_are_crop_then_photometric() -> None:
    spec = ViewSpec(blur_p=0.5, solarize_p=0.5)
    p = sample_view(spec, torch.Generator().manual_seed(3), 7, 30, 40)
    g = torch.Generator().manual_seed(3)
    box = sample_crop_boxes(g, 7, 30, 40, spec.crop_scale, spec.crop_ratio)
    flip = torch.rand(7, generator=g, dtype=torch.float64) < spec.flip_p
    q = sample_photometric(spec, g, 7)
    assert torch.equal(p.box, box) and torch.equal(p.flip, flip)
    for name in ("brightness", "contrast", "saturation", "hue", "gray", "sigma", "solarize"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name
    assert p.jitter_order == q.jitter_order


@pytest.mark.parametrize("channels", [3, 1])
def test_call_is_crop_then_photometric(channels: int) -> None:
    specs = (*BYOL_VIEWS, ViewSpec(gray_p=0.5, blur_p=0.5, solarize_p=0.5))
    mean, std = (0.4, 0.5, 0.6)[:channels], (0.2, 0.25, 0.3)[:channels]
    augment = Augmenter(specs, 20, mean, std)
    images = torch.randint(0, 256, (6, channels, 31, 27), dtype=torch.uint8)
    got = augment(images, torch.Generator().manual_seed(11))
    params = augment.sample(torch.Generator().manual_seed(11), 6, 31, 27)
    x = images.float() / 255
    for out, p in zip(got, params, strict=True):
        cropped = crop_resize_flip(x, p.box, p.flip, 20)
        assert torch.equal(apply_view(x, p, 20), apply_photometric(cropped, p))
        assert torch.equal(out, normalize(apply_photometric(cropped, p), mean, std))


def test_photometric_matches_the_photometric_part_of_apply_view(small_folder: Path) -> None:
    specs = (*BYOL_VIEWS, ViewSpec(gray_p=0.5, blur_p=0.5, solarize_p=0.5))
    source = FolderSource(small_folder, 20)
    plan = CropPlan(specs, size=16, seed=0, epoch=0)
    (batch,) = source.batches([torch.arange(6)], plan)
    augment = Augmenter(specs, 16, source.mean, source.std)
    got = augment.photometric(batch.views, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    params = [sample_photometric(spec, g, 6) for spec in specs]
    for v, (out, p) in enumerate(zip(got, params, strict=True)):
        assert out.dtype == torch.float32 and out.shape == (6, 3, 16, 16)
        x = batch.views[:, v].float() / 255
        assert torch.equal(out, normalize(apply_photometric(x, p), source.mean, source.std))
        # apply_view = crop + the same photometric transform: with an identity crop (full
        # box, no flip, same size) it matches the views' photometric half.
        whole = ViewParams(
            box=torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(6, 1),
            flip=torch.zeros(6, dtype=torch.bool),
            **{f.name: getattr(p, f.name) for f in fields(PhotometricParams)},
        )
        assert torch.allclose(apply_view(x, whole, 16), apply_photometric(x, p), atol=1e-5)
    with pytest.raises(ValueError, match="views"):
        augment.photometric(batch.views[:, :2], torch.Generator())
    with pytest.raises(ValueError, match="uint8"):
        augment.photometric(batch.views.float(), torch.Generator())
