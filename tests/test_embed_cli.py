"""`rela-train embed` and `rela-train transportability` end to end, resume, and user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_folder import make_image_folder
from rela_train.cli import main
from rela_train.prior.embedding import TRANSPORT_FILE, embed
from rela_train.prior.loaders import load_prior

import rela_kernels as rk
from rela_kernels import store as store_module

PRIOR = "random:resnet10-small"
FAST = ["--input-size", "8", "--workers", "0", "--no-progress", "--batch-size", "3"]


@pytest.fixture
def seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


@pytest.fixture
def folder(tmp_path: Path, seed: int) -> Path:
    return make_image_folder(tmp_path / "data", classes=3, per_class=7, seed=seed)  # 21 images


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def store_bytes(path: Path) -> bytes:
    return (path / store_module.DATA).read_bytes()


def test_embed_end_to_end_then_rerun_resumes(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "store"
    argv = ["embed", "--data-dir", str(folder), "--prior", PRIOR, "--out", str(out), *FAST]
    code, stdout, stderr = run(capsys, *argv, "--chunk-rows", "6", "--dim", "5")
    assert code == 0, stderr
    assert "21 x 512 embeddings (21 computed now); transport 512 -> 5" in stdout
    store = rk.EmbeddingStore.open(out)
    assert store.complete and store.shape == (21, 512) and store.chunk_rows == 6
    assert store.input_size == 8 and store.prior.startswith("random:resnet10-small:seed=0 | ")
    transport = rk.Transport.load(out / TRANSPORT_FILE)
    assert transport.in_dim == 512 and transport.out_dim == 5
    targets = (torch.from_numpy(np.array(store.array)).double() - transport.mean.double()) @ (
        transport.matrix.double()
    )
    torch.testing.assert_close(
        targets.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        targets.var(0, unbiased=False), torch.ones(5, dtype=torch.float64), atol=1e-3, rtol=0
    )
    # The stored rows are the prior's embeddings of the preprocessed images, in sorted order.
    prior = load_prior(PRIOR, input_size=8)
    from rela_train.data.folder import ImageFolder

    dataset = ImageFolder(folder, prior.transform)
    images = torch.stack([dataset[i][0] for i in (0, 7, 20)])
    torch.testing.assert_close(
        store.read([0, 7, 20], dtype=torch.float32), prior.encode(images), rtol=2e-3, atol=2e-3
    )

    before = store_bytes(out)
    code, stdout, stderr = run(capsys, *argv, "--dim", "4")
    assert code == 0 and "(0 computed now)" in stdout and "already stored" in stderr
    assert store_bytes(out) == before
    assert rk.Transport.load(out / TRANSPORT_FILE).out_dim == 4  # refitted at the new width


def test_crash_then_resume_is_byte_identical_and_skips_finished_chunks(
    folder: Path, tmp_path: Path
) -> None:
    options = {"batch_size": 2, "workers": 0, "chunk_rows": 4, "progress": False, "dim": 3}
    embed(folder, load_prior(PRIOR, input_size=8), tmp_path / "reference", **options)

    crashing = load_prior(PRIOR, input_size=8)
    real_encode = crashing.encode
    calls = []

    def encode_then_crash(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        if len(calls) == 6:  # chunks 0-1 (4 batches) done, chunk 2 half done
            raise RuntimeError("simulated crash")
        return real_encode(images)

    crashing.encode = encode_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed(folder, crashing, tmp_path / "resumed", **options)
    assert rk.EmbeddingStore.open(tmp_path / "resumed").rows_done == 8
    assert not (tmp_path / "resumed" / TRANSPORT_FILE).exists()

    resumed = load_prior(PRIOR, input_size=8)
    encoded = []
    real = resumed.encode
    resumed.encode = lambda images: encoded.append(len(images)) or real(images)
    result = embed(folder, resumed, tmp_path / "resumed", **options)
    assert sum(encoded) == 21 - 8 == result.computed_rows  # nothing finished is recomputed
    assert store_bytes(tmp_path / "resumed") == store_bytes(tmp_path / "reference")


def test_embed_subprocess_with_workers(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pixels"
    command = [sys.executable, "-m", "rela_train", "embed", "--data-dir", str(folder), "--out"]
    command += [str(out), "--prior", "pixels:4", "--workers", "2", "--batch-size", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "21 x 48 embeddings (21 computed now); transport 48 -> 20" in done.stdout
    prior = load_prior("pixels:4")
    from rela_train.data.folder import ImageFolder

    dataset = ImageFolder(folder, prior.transform)
    expected = torch.stack([dataset[i][0].flatten() for i in range(21)])
    store = rk.EmbeddingStore.open(out)
    assert torch.equal(store.read(range(21)), expected.half())

    # A user error from the real entry point: one line on stderr, exit status 2, no traceback.
    command += ["--dim", "49"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "rela-train embed: error: dim 49 is larger than the prior's embedding width 48"
    ]


def test_embed_precomputed_embeddings(
    folder: Path, tmp_path: Path, seed: int, capsys: pytest.CaptureFixture[str]
) -> None:
    values = np.random.default_rng(seed).standard_normal((21, 6)).astype(np.float32)
    np.save(tmp_path / "e.npy", values)
    out = tmp_path / "from_npy"
    argv = ["embed", "--data-dir", str(folder), "--prior", f"embeddings:{tmp_path / 'e.npy'}"]
    code, _, stderr = run(capsys, *argv, "--out", str(out), "--no-progress")
    assert code == 0, stderr
    store = rk.EmbeddingStore.open(out)
    assert np.array_equal(store.array, values.astype(np.float16))
    assert store.input_size is None and store.prior.startswith("embeddings:e.npy@sha256:")
    assert rk.Transport.load(out / TRANSPORT_FILE).out_dim == 6  # min(256, D, N - 1)


def test_embed_user_errors_exit_2_and_overwrite_nothing(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "store"
    base = [
        "embed",
        "--data-dir",
        str(folder),
        "--out",
        str(out),
        "--workers",
        "0",
        "--no-progress",
    ]
    assert run(capsys, *base, "--prior", "pixels:2", "--chunk-rows", "8")[0] == 0
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}

    other = make_image_folder(tmp_path / "other", classes=1, per_class=21)
    (tmp_path / "model.pt").write_bytes(b"definitely not torchscript")
    np.save(tmp_path / "short.npy", np.zeros((20, 4), dtype=np.float32))
    cases = [
        (["--prior", "pixels:2", "--data-dir", str(other)], "made with dataset fingerprint"),
        (["--prior", "pixels:3"], "made with prior 'pixels:2 | "),
        (["--prior", "pixels:2", "--chunk-rows", "4"], "chunks of 8 rows"),
        (["--prior", "pixels:2", "--dim", "13"], "larger than the prior's embedding width 12"),
        (["--prior", "pixels:3", "--dim", "21"], "needs at least 22 images"),
        (["--prior", "warp:9"], "unknown prior kind 'warp'"),
        (["--prior", f"torchscript:{tmp_path / 'model.pt'}"], "is not a TorchScript archive"),
        (["--prior", f"embeddings:{tmp_path / 'short.npy'}"], "20 rows but the dataset has 21"),
        (["--prior", "pixels:2", "--data-dir", str(tmp_path / "void")], "does not exist"),
        (["--prior", "pixels:2", "--device", "cuda:99"], "device"),
    ]
    for extra, message in cases:
        argv = list(base)
        if "--data-dir" in extra:
            argv[argv.index("--data-dir") + 1] = extra[extra.index("--data-dir") + 1]
            i = extra.index("--data-dir")
            extra = extra[:i] + extra[i + 2 :]
        code, _, stderr = run(capsys, *argv, *extra)
        assert code == 2, (extra, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rela-train embed: error: "), stderr
        assert message in lines[0], (message, lines[0])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot

    # A device that is no device at all is refused while the flags are read.
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--prior", "pixels:2", "--device", "cuda:one"])
    assert exit_info.value.code == 2
    assert "--device: expected auto, cpu, cuda or cuda:N, got 'cuda:one'" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot

    data = out / store_module.DATA
    data.write_bytes(data.read_bytes()[:-10])
    code, _, stderr = run(capsys, *base, "--prior", "pixels:2")
    assert code == 2 and "truncated" in stderr
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors also exit with 2
        main(["embed", "--data-dir", str(folder)])
    assert exit_info.value.code == 2


def write_store(path: Path, values: np.ndarray, fingerprint: str = "same-data") -> None:
    with rk.EmbeddingStore.create_or_resume(
        path, len(values), values.shape[1], fingerprint=fingerprint, prior="p", input_size=None
    ) as store:
        for start, stop in store.pending_chunks():
            store.write_chunk(start, values[start:stop])


def test_transportability(tmp_path: Path, seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((6000, 12)).astype(np.float32)
    mixed = a @ rng.standard_normal((12, 20)) + rng.standard_normal(20) * 5
    noise = rng.standard_normal((6000, 20)).astype(np.float32)
    write_store(tmp_path / "a", a)
    write_store(tmp_path / "linear", mixed.astype(np.float32))
    write_store(tmp_path / "noise", noise)
    write_store(tmp_path / "elsewhere", noise, fingerprint="other-data")

    code, stdout, _ = run(
        capsys, "transportability", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "linear")
    )
    assert code == 0 and "held-out R^2 of the linear map A -> B: " in stdout
    assert "4800 training / 1200 held-out" in stdout
    r2 = float(stdout.split("A -> B: ")[1].split()[0])
    assert r2 > 0.999
    argv = ["transportability", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "noise")]
    code, stdout, _ = run(capsys, *argv, "--json", "--holdout", "0.5", "--seed", "3")
    result = json.loads(stdout)
    assert code == 0 and abs(result["r2"]) < 0.02 and result["test_rows"] == 3000
    assert result["seed"] == 3 and result["a_dim"] == 12 and result["b_dim"] == 20

    for extra, message in [
        (["--b", str(tmp_path / "elsewhere")], "different datasets"),
        (["--b", str(tmp_path / "missing")], "no embedding store"),
        (["--b", str(tmp_path / "noise"), "--holdout", "1.5"], "holdout must be a fraction"),
        (["--b", str(tmp_path / "noise"), "--ridge", "-1"], "ridge must be a finite number"),
    ]:
        code, _, stderr = run(capsys, "transportability", "--a", str(tmp_path / "a"), *extra)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
