"""Batched export against batch-1 export: items/s embedding evaluation items with the tiny model, one run.

    .venv/bin/python benchmarks/export.py                  # 192 items (96 images, 96 captions), batch 32
    .venv/bin/python benchmarks/export.py --items 512 --batch 64

Both paths call the same `embed_items` (the code `cafe export` runs) on the same shapes-world images and
captions; only the batch size differs. The embeddings of both must agree (checked), so batching changes
nothing but speed. Target: at least 8x.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafe_core.config import ModelConfig, PromptConfig  # noqa: E402
from cafe_core.data.shapes import detailed_caption, png_bytes, render, sample_scene  # noqa: E402
from cafe_core.evaluate.export import Item, embed_items  # noqa: E402
from cafe_core.model.build import build  # noqa: E402
from cafe_core.model.inputs import InputBuilder  # noqa: E402
from cafe_core.model.joint import CafeModel  # noqa: E402


def items(n: int, seed: int = 0) -> list[Item]:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n // 2)]
    return ([Item(f"image/{i}", "image", "bench", image=png_bytes(render(s, 64))) for i, s in enumerate(scenes)]
            + [Item(f"text/{i}", "text", "bench", text=detailed_caption(s, rng)) for i, s in enumerate(scenes)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=192)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf, processor = build(ModelConfig())
    model = CafeModel(hf).eval()
    builder = InputBuilder(processor, PromptConfig(), 2048)
    data = items(args.items)
    device = torch.device("cpu")
    embed_items(model, builder, data[:4] + data[-4:], 4, device)  # warm-up
    timings = {}
    outputs = {}
    for batch in (args.batch, 1):
        start = time.perf_counter()
        outputs[batch] = embed_items(model, builder, data, batch, device)
        timings[batch] = time.perf_counter() - start
    diff = float((outputs[args.batch] - outputs[1]).abs().max())
    print(f"{len(data)} items ({len(data) // 2} images, {len(data) // 2} captions), tiny model, {args.threads} threads")
    print(f"  batch 1:  {timings[1]:6.2f} s  {len(data) / timings[1]:8.1f} items/s")
    print(f"  batch {args.batch}: {timings[args.batch]:6.2f} s  {len(data) / timings[args.batch]:8.1f} items/s")
    print(f"  ratio: {timings[1] / timings[args.batch]:.1f}x (target >= 8x); max |difference| of embeddings {diff:.2e}")


if __name__ == "__main__":
    main()
