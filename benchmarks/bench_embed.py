"""Images/s of a prior's forward pass, the work `rela-train embed` does per batch once the images
are decoded (ResNet-50 at 224 px by default; on CUDA in channels_last under bf16 autocast, as the
prior runs there). Results: benchmarks/results/embed.jsonl.

    python benchmarks/bench_embed.py --device cuda
    python benchmarks/bench_embed.py --quick          # tiny CPU smoke run, nothing saved

With ``--nproc N`` it measures the whole sharded ``embed`` instead (decoding a generated JPEG
folder, the forward pass, the store's writes) on N ranks of ``--threads`` threads each, launched
with torchrun; each rank reports its images/s, the total is all rows over the slowest rank's time.
``--compare`` runs 2 ranks x 1 thread and 1 rank x 2 threads in turn (``--repeat`` times each,
interleaved) and records the ratio of their total images/s. Results: embed_sharded.jsonl.

    python benchmarks/bench_embed.py --nproc 2 --threads 1
    python benchmarks/bench_embed.py --compare --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_result, environment, median_time  # noqa: E402
from rela_train.data.jpeg_folder import make_jpeg_folder  # noqa: E402
from rela_train.peers import Peers  # noqa: E402
from rela_train.prior.embedding import embed  # noqa: E402
from rela_train.prior.loaders import load_prior  # noqa: E402
from rela_train.runtime import resolve_device, setup  # noqa: E402

SHARDED_PRIOR, SHARDED_SIZE, SHARDED_BATCH, SHARDED_IMAGES = "random:resnet18", 96, 32, 384


def bench(prior_spec: str, size: int, batch: int, device: torch.device, repeat: int) -> dict:
    prior = load_prior(prior_spec, device=device, input_size=size)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    seconds = median_time(lambda: prior.encode(images), warmup=2, repeat=repeat, device=device)
    return {
        "benchmark": "embed",
        "prior": prior_spec,
        "input_size": size,
        "batch_size": batch,
        "dim": prior.dim,
        "batch_ms": seconds * 1e3,
        "images_per_s": batch / seconds,
        "timing": "do_bench median" if device.type == "cuda" else f"median of {repeat}",
        **environment(device),
    }


# -------------------------------------------------------------------------------------------------
# The sharded embed: N ranks of T threads
# -------------------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    """One rank (or the only process) of a measured embed: writes its rows and compute time."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    options = dict(
        batch_size=args.batch_size, workers=0, device=device, chunk_rows=args.batch_size,
        input_size=args.input_size, progress=False, transport=False, log=lambda message: None,
    )  # fmt: skip
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        ctx = setup(device, 600.0)
        with Peers(ctx, "benchmark embedding", "rerun the benchmark") as peers:
            result = embed(args.data, args.prior, args.store, **options, peers=peers)
        rank = ctx.rank
        ctx.close()
    else:
        result = embed(args.data, args.prior, args.store, **options)
        rank = 0
    record = {"rank": rank, "rows": result.computed_rows, "seconds": result.seconds}
    (Path(args.worker) / f"rank{rank}.json").write_text(json.dumps(record))


def _sharded_run(args: argparse.Namespace, data: Path, nproc: int, threads: int) -> dict:
    """Embed ``data`` once on ``nproc`` ranks of ``threads`` threads; per-rank and total rates."""
    with tempfile.TemporaryDirectory() as scratch:
        results = Path(scratch) / "results"
        results.mkdir()
        script = [str(Path(__file__).resolve()), "--worker", str(results), "--data", str(data)]
        script += ["--store", str(Path(scratch) / "store"), "--prior", args.prior]
        script += ["--input-size", str(args.input_size), "--batch-size", str(args.batch_size)]
        script += ["--threads", str(threads), "--device", args.device]
        if nproc > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command = launch + ["--nproc-per-node", str(nproc), *script]
        else:
            command = [sys.executable, *script]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        started = time.perf_counter()
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - started
        ranks = sorted(
            (json.loads(p.read_text()) for p in results.glob("rank*.json")),
            key=lambda r: r["rank"],
        )
    rows = sum(r["rows"] for r in ranks)
    return {
        "per_rank_images_per_s": [r["rows"] / r["seconds"] for r in ranks],
        "per_rank_rows": [r["rows"] for r in ranks],
        "images_per_s": rows / max(r["seconds"] for r in ranks),
        "launch_wall_s": wall,
    }


def sharded(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    if args.compare:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    else:
        configs = [(args.nproc, args.threads)]
    with tempfile.TemporaryDirectory() as scratch:
        data = make_jpeg_folder(
            Path(scratch) / "data", classes=4, per_class=args.images // 4, size_range=(64, 160)
        )
        load_start = os.getloadavg()[0]
        runs: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeat):  # interleaved: a busy moment of the machine hits all alike
            for nproc, threads in configs:
                runs[(nproc, threads)].append(_sharded_run(args, data, nproc, threads))
    records = []
    for (nproc, threads), measured in runs.items():
        best = statistics.median(m["images_per_s"] for m in measured)
        record = {
            "benchmark": "embed_sharded",
            "prior": args.prior,
            "input_size": args.input_size,
            "batch_size": args.batch_size,
            "images": (args.images // 4) * 4,
            "nproc": nproc,
            "threads": threads,
            "decode_workers": 0,
            "images_per_s": best,
            "images_per_s_runs": [m["images_per_s"] for m in measured],
            "per_rank_images_per_s": [m["per_rank_images_per_s"] for m in measured],
            "per_rank_rows": measured[0]["per_rank_rows"],
            "launch_wall_s": [m["launch_wall_s"] for m in measured],
            "timing": f"median of {args.repeat} interleaved runs; a rank's rate is its rows over "
            "its own compute time, the total is all rows over the slowest rank's",
            "load_average_1min_start": round(load_start, 2),
            "note": args.note,
            **environment(device),
        }
        records.append(record)
        per_rank = ", ".join(f"{v:.1f}" for v in measured[-1]["per_rank_images_per_s"])
        print(
            f"embed {args.prior} {args.input_size} px on {nproc} rank(s) x {threads} thread(s): "
            f"{best:.1f} images/s in total (last run per rank: {per_rank})"
        )
    if args.compare:
        ratio = records[0]["images_per_s"] / records[1]["images_per_s"]
        first, second = (f"{n} rank(s) x {t} thread(s)" for n, t in configs[:2])
        print(f"{first} / {second}: {ratio:.3f}")
        for record in records:
            record["ratio"] = {"of": list(configs[0]), "to": list(configs[1]), "value": ratio}
    if not args.no_save:
        for record in records:
            append_result(args.out or "embed_sharded.jsonl", record)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prior", default=None)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny model and images, no save")
    parser.add_argument("--out", default=None, help="file under benchmarks/results/")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--nproc", type=int, default=None, help="ranks of a sharded embed")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (--nproc)")
    parser.add_argument("--compare", action="store_true", help="2 ranks x 1 vs 1 rank x 2")
    parser.add_argument(
        "--configs",
        default="2x1,1x2",
        help="(--compare) RANKSxTHREADS runs, interleaved; the ratio is the first two's",
    )
    parser.add_argument("--images", type=int, default=SHARDED_IMAGES, help="(--nproc/--compare)")
    parser.add_argument("--note", default="", help="(--nproc/--compare) recorded as is")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.nproc or args.compare:
        args.prior = args.prior or SHARDED_PRIOR
        args.input_size = args.input_size or SHARDED_SIZE
        args.batch_size = args.batch_size or SHARDED_BATCH
        args.repeat = args.repeat or 3
        if args.worker:
            _worker(args)
        else:
            sharded(args)
        return
    args.prior = args.prior or "random:resnet50"
    args.input_size = args.input_size or 224
    args.batch_size = args.batch_size or 256
    args.repeat = args.repeat or 5
    args.out = args.out or "embed.jsonl"
    device = resolve_device(args.device)
    if args.quick:
        args.prior, args.input_size, args.batch_size, args.repeat = "random:resnet10", 32, 8, 2
        args.no_save = True
    record = bench(args.prior, args.input_size, args.batch_size, device, args.repeat)
    print(
        f"embed {record['prior']} {record['input_size']} px batch {record['batch_size']} on "
        f"{record['device']}: {record['batch_ms']:.2f} ms/batch, {record['images_per_s']:.0f} img/s"
    )
    if not args.no_save:
        append_result(args.out, record)


if __name__ == "__main__":
    main()
