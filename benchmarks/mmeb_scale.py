"""MMEB at its real shape: forwards against candidate slots, time and peak memory of `cafe export` +
`cafe evaluate` (mmeb family) with the tiny model, for one dataset of each kind alone and for all 36.

    .venv/bin/python benchmarks/mmeb_scale.py                              # 36 x 1,000 queries x 1,000 candidates
    .venv/bin/python benchmarks/mmeb_scale.py --queries 100 --candidates 100   # a quick look

An MMEB-eval-layout folder is written under a temporary directory: the 36 dataset names with their
meta-tasks, ``--queries`` rows each, ``--candidates`` candidates per row (positive first), and the sharing of
the real benchmark (its lists are drawn from a dataset's own pool, not made per row):

- Classification: each query is its own image; every row's candidates are the dataset's label set.
- VQA: image + question per query; the candidates are drawn from the dataset's answer pool (2 x candidates).
- Retrieval: text->image and image->text datasets alternate; the candidates are drawn from the dataset's
  corpus (queries + candidates items), the query's own target first.
- Grounding: image + expression per query; candidate crops are drawn from the dataset's crop corpus.

Images are 32 px PNGs with distinct pixels. Each run is a fresh process (peak RSS is per process): it
exports (the forwards are counted where the model is called) and evaluates the mmeb family. The kinds differ
in what one dataset costs (a grounding query's long instruction and image make longer sequences than a
class name), so "flat" compares all 36 with the heaviest dataset alone. Targets: forwards = distinct items;
peak memory with 36 datasets < 1.2x that of the heaviest single one.
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
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafe_core.evaluate.sets import MMEB_DATASETS  # noqa: E402

TOKEN = "<|image_1|>"  # MMEB-eval's placeholder, as in the real files


def _png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _draw(rng: np.random.Generator, pool: int, positive: int, k: int) -> list[int]:
    """The positive, then k - 1 other members of a pool."""
    others = rng.choice(pool - 1, size=k - 1, replace=False)
    return [positive, *[o + (o >= positive) for o in others.tolist()]]


def write_set(folder: Path, names: list[str], queries: int, candidates: int, seed: int = 0) -> tuple[int, int]:
    """The MMEB-layout folder of these datasets; returns (slots, distinct (text, image) items)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()),
                        ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])
    slots, distinct = 0, set()
    listing = []
    for d, (name, (meta_task, split)) in enumerate(MMEB_DATASETS.items()):
        if name not in names:
            continue
        rng = np.random.default_rng([seed, d])
        images = folder / "images" / name
        images.mkdir(parents=True)

        def image(key: str) -> str:
            path = images / f"{key}.png"
            if not path.exists():
                path.write_bytes(_png(rng))
            return f"images/{name}/{key}.png"

        rows = []
        corpus = queries + candidates
        for q in range(queries):
            if meta_task == "Classification":
                label = q % candidates
                texts = [f"{name} label {c}" for c in _draw(rng, candidates, label, candidates)]
                row = (f"{TOKEN} Represent the given image for classification", image(f"q{q}"), texts, [""] * len(texts))
            elif meta_task == "VQA":
                texts = [f"{name} answer {a}" for a in _draw(rng, 2 * candidates, q % (2 * candidates), candidates)]
                row = (f"{TOKEN} Represent the given image with the question: q{q}?", image(f"q{q}"), texts,
                       [""] * len(texts))
            elif meta_task == "Retrieval" and d % 2 == 0:  # text -> image
                picks = _draw(rng, corpus, q, candidates)
                row = (f"Find me an everyday image that matches the given caption: caption {q}", "",
                       [f"{TOKEN} Represent the given image."] * len(picks), [image(f"c{p}") for p in picks])
            elif meta_task == "Retrieval":  # image -> text
                picks = _draw(rng, corpus, q, candidates)
                row = (f"{TOKEN} Find an image caption describing the given everyday image.", image(f"q{q}"),
                       [f"{name} caption {p}" for p in picks], [""] * len(picks))
            else:  # grounding: candidate crops
                picks = _draw(rng, corpus, q, candidates)
                row = (f"{TOKEN} Select the portion of the image that follows the language expression: object {q}",
                       image(f"q{q}"), [f"{TOKEN} Represent the given cropped image of the object."] * len(picks),
                       [image(f"crop{p}") for p in picks])
            rows.append(dict(zip(schema.names, row)))
            slots += 1 + len(row[2])
            distinct.add((row[0], row[1]))
            distinct.update(zip(row[2], row[3]))
        (folder / name).mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name / "test.parquet")
        listing.append({"name": name, "meta_task": meta_task, "split": split})
    (folder / "datasets.json").write_text(json.dumps({"datasets": listing}))
    return slots, len(distinct)


def child(folder: Path, work: Path, threads: int) -> dict:
    """Export + evaluate (mmeb) in this fresh process; the forwards counted where the model is called."""
    import torch

    torch.set_num_threads(threads)
    from cafe_core.config import ModelConfig, load_config
    from cafe_core.evaluate import export as export_module
    from cafe_core.model.build import build, save
    from cafe_core.stages.evaluate import evaluate
    from cafe_core.storage import Storage

    model_dir = work / "model"
    hf, processor = build(ModelConfig())
    save(hf, processor, model_dir, cafe_config_yaml="{}", metrics={})
    del hf, processor
    cfg = load_config("configs/local.yaml", [f"root={work}", "run_id=bench"])
    cfg.eval_sets.retrieval, cfg.eval_sets.mmeb = {}, str(folder)
    cfg.export.checkpoint = cfg.evaluate.checkpoint = str(model_dir)
    cfg.export.output = cfg.evaluate.embeddings = str(work / "export")
    cfg.evaluate.output = str(work / "evaluate")
    cfg.export.batch_size = 64
    forwards = 0
    embed = export_module.embed_items

    def counted(model, builder, items, batch_size, device):
        nonlocal forwards
        forwards += len(items)
        return embed(model, builder, items, batch_size, device)

    export_module.embed_items = counted
    store = Storage()
    start = time.perf_counter()
    result = export_module.export(cfg, store, progress=False)
    exported = time.perf_counter() - start
    export_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    out = evaluate(cfg, store, families=["mmeb"], progress=False).uri
    evaluated = time.perf_counter() - start
    metrics = json.loads((Path(out) / "metrics.json").read_text())["metrics"]
    return {"forwards": forwards, "items": result.items, "slots": result.slots, "export_s": exported,
            "evaluate_s": evaluated, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "export_peak_rss_mb": export_peak,
            "p@1": metrics["mmeb/overall/p@1"]}


# One dataset of each kind the set holds (its sequences, and so the model's activations, differ by kind).
SINGLES = ["ImageNet-1K", "OK-VQA", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO"]


def run(names: list[str], args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder, work = Path(tmp) / "mmeb", Path(tmp) / "work"
        start = time.perf_counter()
        slots, distinct = write_set(folder, names, args.queries, args.candidates)
        written = time.perf_counter() - start
        proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", str(folder),
                               str(work)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"the run of {names} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["slots"] == slots, (out["slots"], slots)
    label = names[0] if len(names) == 1 else f"{len(names)} datasets"
    print(f"{label:>16}: {slots:>11,} candidate slots, {distinct:>7,} distinct items; forwards {out['forwards']:>7,} "
          f"(= distinct: {out['forwards'] == distinct}, {slots / max(out['forwards'], 1):.0f}x fewer than slots); "
          f"export {out['export_s']:.0f} s, evaluate {out['evaluate_s']:.0f} s; peak RSS {out['peak_rss_mb']:.0f} MB "
          f"(export {out['export_peak_rss_mb']:.0f} MB); p@1 {out['p@1']:.3f}  [set written in {written:.0f} s]",
          flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=int, default=len(MMEB_DATASETS), help="the large run: the first N")
    parser.add_argument("--singles", nargs="*", default=SINGLES, help="datasets run alone, one process each")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.threads)))
        return
    print(f"MMEB shape: {args.queries} queries x {args.candidates} candidates per dataset, tiny model, "
          f"{args.threads} threads; each run a fresh process")
    singles = [run([name], args) for name in args.singles]
    everything = run(list(MMEB_DATASETS)[: args.datasets], args)
    if singles:
        heaviest = max(r["peak_rss_mb"] for r in singles)
        print(f"peak memory, {args.datasets} datasets against the heaviest single dataset: "
              f"{everything['peak_rss_mb'] / heaviest:.2f}x (target < 1.2x)")


if __name__ == "__main__":
    main()
