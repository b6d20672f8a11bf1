"""Benchmark: ``rk.fit_pca_whitening`` over an ImageNet-sized embedding store.

Writes a synthetic N x D float16 EmbeddingStore (default N = 1,281,167, D = 768: ~2 GB) into a
temporary directory under /tmp, fits the whitening from it, and deletes the store. Each fit runs
in a fresh process; its resident set is sampled every 5 ms during the fit, so the fit's own memory
(peak during the fit minus the RSS just before it, with torch loaded and the store opened) is
reported next to the process's lifetime peak (ru_maxrss, which includes importing torch). The
store was just written, so it is read from the page cache (a cold read adds disk time).

Variants: ``float64`` is the library (per-chunk Gram GEMMs in float64); ``float32`` runs the same
streaming code with float32 GEMMs (merge still float64), to measure the trade-off behind that
choice. Results are appended to benchmarks/results/pca.jsonl.

    python benchmarks/bench_pca.py                     # full size, both variants
    python benchmarks/bench_pca.py --n 100000 --d 256  # a quick check
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue as queue_module
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rela_kernels as rk  # noqa: E402
from benchmarks.common import append_result, environment  # noqa: E402

RESULTS = "pca.jsonl"
WRITE_CHUNK_ROWS = 65536


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class RssSampler(threading.Thread):
    """Samples the resident set every 5 ms: the fit's own peak, even below the import peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = current_rss_mb()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, current_rss_mb())

    def stop(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak, current_rss_mb())


def make_store(path: Path, n: int, d: int, seed: int) -> float:
    """Low-rank structure + noise + offset, like real embeddings; returns seconds taken."""
    generator = torch.Generator().manual_seed(seed)
    rank = 64
    mixing = torch.randn(rank, d, generator=generator) / rank**0.5
    scales = torch.logspace(0.5, -1, rank)[:, None]
    offset = torch.randn(d, generator=generator)
    start = time.perf_counter()
    with rk.EmbeddingStore.create_or_resume(
        path,
        n,
        d,
        fingerprint="synthetic",
        prior="synthetic",
        input_size=None,
        chunk_rows=WRITE_CHUNK_ROWS,
    ) as store:
        for first, stop in store.pending_chunks():
            rows = stop - first
            latent = torch.randn(rows, rank, generator=generator)
            values = latent @ (scales * mixing) + 0.05 * torch.randn(rows, d, generator=generator)
            store.write_chunk(first, (values + offset).to(torch.float16))
    return time.perf_counter() - start


def _fit_in_child(path: str, dim: int, gemm: str, queue: multiprocessing.Queue) -> None:
    store = rk.EmbeddingStore.open(path)
    before = current_rss_mb()
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    transport = rk.fit_pca_whitening(store, dim, gemm_dtype=getattr(torch, gemm))
    seconds = time.perf_counter() - start
    during = sampler.stop()
    queue.put(
        {
            "seconds": seconds,
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_fit_mb": before,
            "rss_peak_during_fit_mb": during,
            "mean": transport.mean.numpy(),
            "matrix": transport.matrix.numpy(),
        }
    )


def fit(path: Path, dim: int, gemm: str) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_fit_in_child, args=(str(path), dim, gemm, queue))
    child.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not child.is_alive():
                raise RuntimeError(f"the {gemm} fit died (exit code {child.exitcode})") from None
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the {gemm} fit failed (exit code {child.exitcode})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_281_167)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=["float64", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="do not append to results")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="rela-bench-pca-", dir="/tmp"))
    try:
        store_path = root / "store"
        write_seconds = make_store(store_path, args.n, args.d, args.seed)
        size_gb = args.n * args.d * 2 / 1e9
        print(f"wrote {args.n} x {args.d} float16 ({size_gb:.2f} GB) in {write_seconds:.1f} s")
        results = {}
        for gemm in args.variants:
            results[gemm] = fit(store_path, args.dim, gemm)
            r = results[gemm]
            print(
                f"fit_pca_whitening [{gemm} GEMMs] N={args.n} D={args.d} dim={args.dim}: "
                f"{r['seconds']:.1f} s; RSS {r['rss_before_fit_mb']:.0f} MB before the fit, "
                f"{r['rss_peak_during_fit_mb']:.0f} MB at its peak (fit: "
                f"+{r['rss_peak_during_fit_mb'] - r['rss_before_fit_mb']:.0f} MB); process "
                f"peak {r['peak_rss_mb']:.0f} MB"
            )
        reference = results.get("float64")
        env = environment("cpu")
        for gemm, r in results.items():
            record = {
                "op": "fit_pca_whitening",
                "gemm_dtype": gemm,
                "N": args.n,
                "D": args.d,
                "dim": args.dim,
                "seconds": round(r["seconds"], 3),
                "peak_rss_mb": round(r["peak_rss_mb"], 1),
                "rss_before_fit_mb": round(r["rss_before_fit_mb"], 1),
                "rss_peak_during_fit_mb": round(r["rss_peak_during_fit_mb"], 1),
                "store_write_seconds": round(write_seconds, 3),
                "page_cache": "warm",
                **env,
            }
            if reference is not None and gemm != "float64":
                # Column scales are sign-free: compare them, relative to float64.
                exact = np.linalg.norm(reference["matrix"], axis=0)
                approx = np.linalg.norm(r["matrix"], axis=0)
                record["max_rel_column_scale_error_vs_float64"] = float(
                    np.max(np.abs(approx - exact) / exact)
                )
                print(
                    f"  {gemm} vs float64: max relative error of the component scales "
                    f"{record['max_rel_column_scale_error_vs_float64']:.2e}"
                )
            if not args.no_save:
                append_result(RESULTS, record)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
