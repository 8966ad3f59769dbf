"""Conversion throughput and peak memory at two input sizes, so that flat memory is visible.

    .venv/bin/python benchmarks/convert.py                 # 1k and 20k samples, 2 workers
    .venv/bin/python benchmarks/convert.py --sizes 1000 5000 --workers 0

Each size runs in a fresh process (peak RSS is a lifetime maximum); the input is LLaVA-OneVision-style
parquet with 64x64 PNG noise images and ~600-character captions, written locally before timing starts.
The last column is each size's peak memory as a ratio of the smallest size's, measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROWS_PER_SHARD = 1000


def make_input(folder: str, n: int) -> None:
    rng = np.random.default_rng(0)
    schema = pa.schema([
        ("id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("data_source", pa.string()),
    ])
    for shard, start in enumerate(range(0, n, ROWS_PER_SHARD)):
        rows = []
        for i in range(start, min(n, start + ROWS_PER_SHARD)):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
            caption = f"Sample {i}. " + "A detailed description of shapes and colours. " * 13
            rows.append({
                "id": f"bench-{i:06d}", "image": {"bytes": buf.getvalue(), "path": None},
                "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}],
                "data_source": "bench",
            })
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f"{folder}/train-{shard:05d}.parquet")


def measure_one(n: int, workers: int) -> dict:
    from cafe_core.config import DataConfig
    from cafe_core.data.convert import convert
    from cafe_core.storage import Storage

    with tempfile.TemporaryDirectory(prefix="cafe-bench-") as tmp:
        os.makedirs(f"{tmp}/in")
        make_input(f"{tmp}/in", n)
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cfg = DataConfig(
            sources=[{"name": "bench", "format": "onevision_parquet", "uri": f"{tmp}/in"}],
            output=f"{tmp}/out", workers=workers, max_reject_rate=0.0,
        )
        t0 = time.perf_counter()
        result = convert(cfg, Storage(), "bench: true\n", progress=False)
        elapsed = time.perf_counter() - t0
    return {
        "n": n, "accepted": result.stats["accepted"], "seconds": elapsed, "samples_per_s": n / elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_convert_mib": base_rss / 1024,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.workers)))
        return
    results = []
    for n in args.sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--workers", str(args.workers)],
            check=True, capture_output=True, text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]
    print(f"conversion, {args.workers} workers, {os.cpu_count()} cores")
    print(f"{'samples':>8} {'seconds':>8} {'samples/s':>10} {'main peak MiB':>14} {'worker peak MiB':>16} {'peak vs first':>14}")
    for r in results:
        ratio = r["peak_rss_mib"] / base["peak_rss_mib"]
        print(
            f"{r['n']:>8} {r['seconds']:>8.1f} {r['samples_per_s']:>10.0f} {r['peak_rss_mib']:>14.0f} "
            f"{r['worker_peak_rss_mib']:>16.0f} {ratio:>13.2f}x"
        )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
