"""Prior loaders, the ResNets behind them, and the image-folder listing and preprocessing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folder import make_image_folder
from PIL import Image
from rela_train.data.folder import EvalTransform, ImageFolder, fingerprint, list_images
from rela_train.models import build_resnet
from rela_train.prior.loaders import ModelPrior, PrecomputedPrior, load_prior
from torch import nn

# Scripting the test encoders is how users export theirs; its deprecation is not ours to report.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


@pytest.fixture
def folder(tmp_path: Path, generator: torch.Generator) -> Path:
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return make_image_folder(tmp_path / "data", classes=2, per_class=4, seed=seed)


def batch(folder: Path, transform: EvalTransform, count: int = 3) -> torch.Tensor:
    dataset = ImageFolder(folder, transform)
    return torch.stack([dataset[i][0] for i in range(count)])


# -------------------------------------------------------------------------------------------------
# ResNets
# -------------------------------------------------------------------------------------------------


def test_resnets_have_torchvision_parameter_counts_and_keys() -> None:
    # torchvision's published sizes: resnet18 11,689,512 parameters and 122 state-dict entries,
    # resnet50 25,557,032 and 320 (with the 1000-class fc).
    for arch, params, entries in (("resnet18", 11_689_512, 122), ("resnet50", 25_557_032, 320)):
        model = build_resnet(arch, num_classes=1000)
        assert sum(p.numel() for p in model.parameters()) == params
        assert len(model.state_dict()) == entries
    keys18 = build_resnet("resnet18", num_classes=10).state_dict()
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv2.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.num_batches_tracked",
        "layer4.1.bn2.bias",
        "fc.weight",
    ):
        assert key in keys18
    assert "layer1.0.downsample.0.weight" not in keys18
    keys50 = build_resnet("resnet50").state_dict()
    assert "layer1.0.conv3.weight" in keys50 and "layer1.0.downsample.1.weight" in keys50
    assert not any(k.startswith("fc.") for k in keys50)  # num_classes=0: no classifier


def test_resnet_variants_and_features(generator: torch.Generator) -> None:
    x = torch.randn(2, 3, 32, 32, generator=generator)
    small = build_resnet("resnet18", small_images=True, width=16, num_classes=5).eval()
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert small.feature_dim == 128 and small.features(x).shape == (2, 128)
    assert small(x).shape == (2, 5)
    assert build_resnet("resnet50", width=8).feature_dim == 256
    wide = build_resnet("resnet10", in_channels=1)
    assert wide(torch.randn(2, 1, 64, 64, generator=generator)).shape == (2, 512)
    zero = build_resnet("resnet18", zero_init_residual=True)
    assert not zero.layer1[0].bn2.weight.any()
    with pytest.raises(ValueError, match="unknown ResNet architecture 'resnet19'"):
        build_resnet("resnet19")


# -------------------------------------------------------------------------------------------------
# Image folder
# -------------------------------------------------------------------------------------------------


def test_listing_is_sorted_and_fingerprinted(folder: Path) -> None:
    (folder / "class_0" / "notes.txt").write_text("not an image")
    (folder / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(folder / ".hidden" / "x.png")
    samples, classes = list_images(folder)
    assert classes == ["class_0", "class_1"]
    assert [s.path for s in samples] == sorted(s.path for s in samples)
    assert len(samples) == 8 and {s.label for s in samples} == {0, 1}
    first = fingerprint(samples)
    assert first == ImageFolder(folder).fingerprint
    victim = folder / samples[3].path
    victim.write_bytes(victim.read_bytes() + b"\0")  # same name, another size
    assert fingerprint(list_images(folder)[0]) != first
    victim.rename(victim.with_name("renamed" + victim.suffix))
    assert fingerprint(list_images(folder)[0]) != first


def test_listing_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="contains no images"):
        list_images(tmp_path / "empty")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        ImageFolder(tmp_path / "bad")[0]


def test_eval_transform_resizes_crops_and_normalises() -> None:
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # the central 20 columns are white
    transform = EvalTransform(size=8, resize=10, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = transform(Image.fromarray(pixels))
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    # 20x40 -> 10x20, the central 8x8 lies inside the white band: (1 - 0.5) / 0.5 = 1.
    torch.testing.assert_close(out, torch.ones(3, 8, 8))
    gray = transform(Image.fromarray(np.full((12, 12), 51, dtype=np.uint8)))
    torch.testing.assert_close(gray, torch.full((3, 8, 8), (0.2 - 0.5) / 0.5))
    with pytest.raises(ValueError, match="size <= resize"):
        EvalTransform(size=8, resize=7)
    with pytest.raises(ValueError, match="interpolation"):
        EvalTransform(size=8, resize=8, interpolation="lanczos9")


# -------------------------------------------------------------------------------------------------
# Priors
# -------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """A scripted stand-in for a CLIP archive: forward and encode_image differ."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.input_resolution = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    @torch.jit.export
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3)))


class Plain(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.amax(dim=(2, 3)), x.amin(dim=(2, 3))], dim=1)


def test_torchscript_prior_uses_encode_image_when_present(tmp_path: Path, folder: Path) -> None:
    module = Encoder().eval()
    torch.jit.script(module).save(str(tmp_path / "clip.pt"))
    prior = load_prior(f"torchscript:{tmp_path / 'clip.pt'}")
    assert isinstance(prior, ModelPrior) and prior.dim == 5
    transform = prior.transform
    assert (transform.size, transform.resize, transform.interpolation) == (12, 12, "bicubic")
    assert transform.mean[0] == pytest.approx(0.48145466)  # CLIP normalisation
    images = batch(folder, transform)
    with torch.no_grad():
        expected = module.encode_image(images)
    torch.testing.assert_close(prior.encode(images), expected)
    assert prior.identity.startswith("torchscript:clip.pt@sha256:")


def test_torchscript_prior_uses_forward_otherwise(tmp_path: Path, folder: Path) -> None:
    torch.jit.script(Plain()).save(str(tmp_path / "plain.pt"))
    default = load_prior(f"torchscript:{tmp_path / 'plain.pt'}")
    assert (default.transform.size, default.transform.resize) == (224, 256)
    prior = load_prior(f"torchscript:{tmp_path / 'plain.pt'}", input_size=14, normalize="none")
    assert prior.dim == 6 and (prior.transform.size, prior.transform.resize) == (14, 16)
    images = batch(folder, prior.transform)
    torch.testing.assert_close(prior.encode(images), Plain()(images))
    assert prior.identity != default.identity  # the preprocessing is part of the identity


def test_checkpoint_prior_loads_torchvision_style_state_dicts(tmp_path: Path, folder: Path) -> None:
    model = build_resnet("resnet18", num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    prior = load_prior(f"checkpoint:resnet18:{tmp_path / 'r18.pth'}", input_size=32)
    assert prior.dim == 512
    images = batch(folder, prior.transform)
    with torch.no_grad():
        torch.testing.assert_close(prior.encode(images), model.features(images))
    # DDP prefixes and a {"state_dict": ...} wrapper load too; the stem and width are inferred.
    small = build_resnet("resnet18", small_images=True, width=8).eval()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in small.state_dict().items()}}
    torch.save(wrapped, tmp_path / "small.pt")
    prior = load_prior(f"checkpoint:resnet18:{tmp_path / 'small.pt'}")
    assert prior.dim == 64 and prior.transform.size == 32
    images = batch(folder, prior.transform)
    with torch.no_grad():
        torch.testing.assert_close(prior.encode(images), small.features(images))


def test_checkpoint_prior_errors(tmp_path: Path) -> None:
    torch.save(build_resnet("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="not a resnet34 state dict; missing keys: layer1.2"):
        load_prior(f"checkpoint:resnet34:{tmp_path / 'r18.pth'}")
    torch.jit.script(Plain()).save(str(tmp_path / "scripted.pt"))
    with pytest.raises(ValueError, match="TorchScript archive, not a PyTorch state dict"):
        load_prior(f"checkpoint:resnet18:{tmp_path / 'scripted.pt'}")
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(ValueError, match="junk.pth is not a PyTorch state dict"):
        load_prior(f"checkpoint:resnet18:{tmp_path / 'junk.pth'}")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_prior(f"checkpoint:resnet18:{tmp_path / 'list.pth'}")
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pth does not exist"):
        load_prior(f"checkpoint:resnet18:{tmp_path / 'nope.pth'}")
    with pytest.raises(ValueError, match="expected checkpoint:ARCH:PATH"):
        load_prior("checkpoint:resnet18")
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'"):
        load_prior(f"checkpoint:vgg16:{tmp_path / 'r18.pth'}")


def test_torchscript_prior_rejects_other_files(tmp_path: Path) -> None:
    torch.save(build_resnet("resnet10").state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="not a TorchScript archive .*checkpoint:ARCH:PATH"):
        load_prior(f"torchscript:{tmp_path / 'weights.pt'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prior(f"torchscript:{tmp_path / 'missing.pt'}")


def test_random_prior_is_seeded_and_leaves_the_global_rng_alone(folder: Path) -> None:
    state = torch.random.get_rng_state()
    a = load_prior("random:resnet10-small", input_size=16)
    b = load_prior("random:resnet10-small:0", input_size=16)
    c = load_prior("random:resnet10-small:1", input_size=16)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.identity == b.identity != c.identity
    assert a.dim == 512 and a.input_size == 16
    images = batch(folder, a.transform)
    assert torch.equal(a.encode(images), b.encode(images))
    assert not torch.equal(a.encode(images), c.encode(images))
    assert load_prior("random:resnet10").transform.size == 224
    with pytest.raises(ValueError, match="seed must be an integer"):
        load_prior("random:resnet18:x")
    with pytest.raises(ValueError, match="unknown architecture 'resnet7'"):
        load_prior("random:resnet7")


def test_pixels_prior(folder: Path) -> None:
    prior = load_prior("pixels:6")
    assert prior.dim == 108 and prior.transform.mean == (0.0, 0.0, 0.0)
    images = batch(folder, prior.transform)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    torch.testing.assert_close(prior.encode(images), images.flatten(1))
    assert load_prior("pixels").dim == 3 * 16 * 16
    with pytest.raises(ValueError, match="expected pixels"):
        load_prior("pixels:big")


def test_embeddings_prior(tmp_path: Path, generator: torch.Generator) -> None:
    values = torch.randn(8, 5, generator=generator)
    np.save(tmp_path / "e.npy", values.numpy())
    torch.save(values.double(), tmp_path / "e.pt")
    torch.save({"embeddings": values}, tmp_path / "d.pt")
    for name in ("e.npy", "e.pt", "d.pt"):
        prior = load_prior(f"embeddings:{tmp_path / name}", num_rows=8)
        assert isinstance(prior, PrecomputedPrior) and prior.dim == 5 and prior.input_size is None
        np.testing.assert_allclose(prior.read(2, 6), values[2:6].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="has 8 rows but the dataset has 9 images"):
        load_prior(f"embeddings:{tmp_path / 'e.npy'}", num_rows=9)
    np.save(tmp_path / "flat.npy", values.numpy().ravel())
    with pytest.raises(ValueError, match=r"2-D float array \[N, D\], got shape \(40,\)"):
        load_prior(f"embeddings:{tmp_path / 'flat.npy'}")
    np.save(tmp_path / "int.npy", np.ones((8, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="2-D float array"):
        load_prior(f"embeddings:{tmp_path / 'int.npy'}")
    (tmp_path / "e.csv").write_text("1,2")
    with pytest.raises(ValueError, match=".npy or .pt file"):
        load_prior(f"embeddings:{tmp_path / 'e.csv'}")
    (tmp_path / "fake.npy").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a .npy array"):
        load_prior(f"embeddings:{tmp_path / 'fake.npy'}")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match="holds a dict"):
        load_prior(f"embeddings:{tmp_path / 'dict.pt'}")
    with pytest.raises(ValueError, match="do not apply"):
        load_prior(f"embeddings:{tmp_path / 'e.npy'}", input_size=32)


@pytest.mark.parametrize("spec", ["timm:resnet50", "open_clip:ViT-B-32:openai"])
def test_hub_priors_explain_how_to_provide_weights(spec: str) -> None:
    package = spec.split(":")[0]
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here; the not-installed path cannot be exercised")
    with pytest.raises(ValueError, match=f"{package} package is not installed.*torchscript:PATH"):
        load_prior(spec)


def test_bad_specs() -> None:
    with pytest.raises(ValueError, match="unknown prior kind 'clip'.*torchscript, checkpoint"):
        load_prior("clip:ViT-B")
    with pytest.raises(ValueError, match="non-empty string"):
        load_prior("")
    with pytest.raises(ValueError, match="normalisation must be one of"):
        load_prior("pixels", normalize="zscore")


class _GrayNet(nn.Module):
    """A network trained on one-channel images: the data reach priors as RGB."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


class _FixedSize(nn.Module):
    """A network whose flatten fixes its input size at 8 x 8."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_a_prior_of_another_channel_count_is_refused_naming_both_shapes(tmp_path: Path) -> None:
    torch.jit.script(_GrayNet()).save(str(tmp_path / "gray.pt"))
    with pytest.raises(ValueError) as caught:
        load_prior(f"torchscript:{tmp_path / 'gray.pt'}", input_size=8)
    message = str(caught.value)
    assert "\n" not in message
    assert "1-channel input" in message and "[B, 3, 8, 8]" in message


def test_a_prior_is_given_its_own_input_size_and_refuses_another(
    tmp_path: Path, folder: Path
) -> None:
    torch.jit.script(_FixedSize()).save(str(tmp_path / "fixed.pt"))
    # The documented rule: images are resized to the prior's input size, so it runs at 8 px ...
    prior = load_prior(f"torchscript:{tmp_path / 'fixed.pt'}", input_size=8)
    assert prior.dim == 4 and prior.transform.size == 8
    images = batch(folder, prior.transform)
    assert images.shape[1:] == (3, 8, 8)
    # ... and a size it cannot take is a one-line error naming the shape it was given.
    with pytest.raises(ValueError) as caught:
        load_prior(f"torchscript:{tmp_path / 'fixed.pt'}", input_size=10)
    message = str(caught.value)
    assert "\n" not in message and "[2, 3, 10, 10]" in message
