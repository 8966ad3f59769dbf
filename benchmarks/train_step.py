"""Samples/s of the CAFe training step against a reference-style step, same tiny model and data, one run.

    .venv/bin/python benchmarks/train_step.py                 # both shapes, batch 8, 20 timed steps each, 2 threads
    .venv/bin/python benchmarks/train_step.py --batch 16 --steps 30
    .venv/bin/python benchmarks/train_step.py --tiny vision_hidden=128 vision_layers=6   # one other tiny shape

The reference-style step is the public reference's structure (SPEC section 2): three forwards per step
(the LM pass, the image-embedding prompt, the text-embedding prompt with an all-zero image so that ZeRO-3
ranks stay in lockstep), the vision tower three times, embeddings gathered without gradient. Ours: the
vision tower once, the LLM over two row groups (conversations packed with the image prompts that reuse
their image tokens; text prompts), no dummy image. Both include backward and an AdamW step; batches are
built before timing, as both trainers build them off the step (data-loader work, printed separately); the
two steps alternate so that machine noise hits both alike. Two shapes by default: the tiny defaults (`make
run`'s model, where text dominates) and the tiny model at the 0.5B model's proportions (vision tower and
image tokens dominate, as in the model the method is for).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafe_core.config import ModelConfig, PromptConfig  # noqa: E402
from cafe_core.data.shapes import detailed_caption, png_bytes, render, sample_scene  # noqa: E402
from cafe_core.loss import JointLoss, lm_loss  # noqa: E402
from cafe_core.model.build import build  # noqa: E402
from cafe_core.model.inputs import InputBuilder, Segment  # noqa: E402
from cafe_core.model.joint import CafeModel  # noqa: E402


def last_token(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The reference's pooling: hidden[i, last position where attention_mask[i] == 1], for either padding side."""
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.flip(1).float().argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [png_bytes(render(s, 64)) for s in scenes]
    captions = [detailed_caption(s, rng) for s in scenes]
    convs = [[{"from": "human", "value": "<image>\nDescribe the image in detail."}, {"from": "gpt", "value": c}]
             for c in captions]
    return images, captions, convs


def reference_inputs(builder: InputBuilder, images, captions, convs) -> dict:
    """The reference's three batches (its data loader's work, outside the step as in its trainer)."""
    pixel_values, image_sizes, counts = builder.images(images)
    return {
        "pixel_values": pixel_values, "image_sizes": image_sizes,
        "lm": builder.pack([[Segment(builder.conversation(c, n))] for c, n in zip(convs, counts)]),
        "img": builder.pack([[Segment(builder.prompt(builder.prompts.image, image_tokens=[n]))] for n in counts]),
        "txt": builder.pack([[Segment(builder.prompt(builder.prompts.text, c))] for c in captions]),
    }


def reference_step(model, inputs: dict, loss: JointLoss):
    """Three forwards, three vision passes, a zero image for the text prompt, no-grad gather."""
    pixel_values, image_sizes, lm, img, txt = (inputs[k] for k in ("pixel_values", "image_sizes", "lm", "img", "txt"))
    out = model(input_ids=lm.input_ids, attention_mask=lm.attention_mask, pixel_values=pixel_values, image_sizes=image_sizes)
    targets = lm.targets[:, 1:]
    keep = targets != -100
    loss_lm = lm_loss(out.logits[:, :-1][keep], targets[keep])
    h_img = model.model(input_ids=img.input_ids, attention_mask=img.attention_mask, pixel_values=pixel_values,
                        image_sizes=image_sizes).last_hidden_state
    h_txt = model.model(input_ids=txt.input_ids, attention_mask=txt.attention_mask).last_hidden_state
    # the all-zero image: run the vision tower and keep it in the graph with weight 0, as the reference does
    dummy = model.get_image_features(torch.zeros_like(pixel_values), image_sizes).pooler_output
    e_img = F.normalize(last_token(h_img, img.attention_mask), dim=-1)
    e_txt = F.normalize(last_token(h_txt, txt.attention_mask), dim=-1)
    with torch.no_grad():  # the reference gathers without gradient (a no-op on one process)
        _ = torch.cat([e_img.detach()]), torch.cat([e_txt.detach()])
    total = loss.a_lm * loss_lm + loss.a_con * loss.infonce(e_img, e_txt) + 0.0 * sum(d.sum() for d in dummy)
    return total


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed(fn, optimizer) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    fn().backward()
    optimizer.step()
    return time.perf_counter() - start


# The 0.5B model's proportions at tiny size: a vision tower as large per token as the LLM (SigLIP-so400m is
# ~1.15x Qwen2-0.5B's non-embedding parameters per token) and image tokens outnumbering text tokens
# (729 per 384 px tile, several tiles, against captions of a few hundred tokens).
PROPORTIONS_0_5B = {"vision_hidden": 128, "vision_heads": 4, "patch_size": 4}


def measure(tiny: dict[str, int], args) -> dict[str, float]:
    model, processor = build(ModelConfig(tiny=tiny))
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    llm = sum(p.numel() for p in model.model.language_model.parameters())
    loss = JointLoss(a_lm=1.0, a_con=10.0)
    ours = CafeModel(model, loss)
    builder = InputBuilder(processor, PromptConfig(), 1024)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images, captions, convs = make_data(args.batch)
    vision_calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: vision_calls.append(1))

    def our_inputs():
        return builder.pairs_batch(images, captions, convs)

    def ref_inputs():
        return reference_inputs(builder, images, captions, convs)

    prep = {}
    for fn in (our_inputs, ref_inputs):
        fn()
        prep[fn.__name__] = statistics.median(_seconds(fn) for _ in range(args.steps))
    batch, inputs = our_inputs(), ref_inputs()

    def our_step():
        return ours(batch)["loss"]

    def ref_step():
        return reference_step(model, inputs, loss)

    passes = {}
    for fn in (our_step, ref_step):  # warm-up, and count vision passes per step
        vision_calls.clear()
        timed(fn, optimizer)
        passes[fn.__name__] = len(vision_calls)
    t_ours, t_ref = [], []
    for _ in range(args.steps):
        t_ours.append(timed(our_step, optimizer))
        t_ref.append(timed(ref_step, optimizer))
    image_tokens = builder.images(images[:1])[2][0]
    return {
        "vision": vision, "llm": llm, "image_tokens": image_tokens, "passes_ours": passes["our_step"],
        "passes_ref": passes["ref_step"], "ref": args.batch / statistics.median(t_ref),
        "ours": args.batch / statistics.median(t_ours), "prep_ours": prep["our_inputs"], "prep_ref": prep["ref_inputs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", nargs="*", default=None, metavar="key=value",
                        help="model.tiny overrides (default: the tiny defaults and the 0.5B proportions, both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny is None:
        shapes = {"tiny defaults": {}, "tiny, 0.5B proportions": PROPORTIONS_0_5B}
    else:
        tiny = {k: int(v) for k, v in (item.split("=", 1) for item in args.tiny)}
        shapes = {" ".join(args.tiny) or "tiny defaults": tiny}
    print(f"batch {args.batch}, {args.steps} timed steps each (forward + backward + AdamW, median), {args.threads} threads")
    print(f"{'model':<26} {'vision/LLM params':>18} {'img tokens':>10} {'vision passes':>13} {'reference':>10} {'this':>8} {'ratio':>6}")
    for name, tiny in shapes.items():
        r = measure(tiny, args)
        print(f"{name:<26} {r['vision'] / 1e3:>8.0f}K/{r['llm'] / 1e3:.0f}K {r['image_tokens']:>10} "
              f"{r['passes_ours']:>6} vs {r['passes_ref']:<4} {r['ref']:>10.1f} {r['ours']:>8.1f} {r['ours'] / r['ref']:>5.2f}x")
        print(f"{'':<26} batch preparation (data-loader work, outside both steps): this {r['prep_ours'] * 1e3:.1f} ms, "
              f"reference-style {r['prep_ref'] * 1e3:.1f} ms")
    print("samples/s; target: ratio >= 2x")


if __name__ == "__main__":
    main()
