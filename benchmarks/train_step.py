"""Samples/s of the CAFe training step against a reference-style step, same tiny model and data, one run.

    .venv/bin/python benchmarks/train_step.py                 # batch 8, 20 timed steps each, 2 threads
    .venv/bin/python benchmarks/train_step.py --batch 16 --steps 30
    .venv/bin/python benchmarks/train_step.py --tiny vision_hidden=128 vision_layers=6   # other tiny shapes

The reference-style step is the public reference's structure (SPEC section 2): three forwards per step
(the LM pass, the image-embedding prompt, the text-embedding prompt with an all-zero image so that ZeRO-3
ranks stay in lockstep), the vision tower three times, embeddings gathered without gradient. Ours: the
vision tower once, one LLM pass over the LM rows and both prompt groups, no dummy image. Both include
backward and an AdamW step; the two alternate so that machine noise hits both alike.
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


def reference_step(model, builder: InputBuilder, images, captions, convs, loss: JointLoss):
    """Three forwards, three vision passes, a zero image for the text prompt, no-grad gather."""
    pixel_values, image_sizes, counts = builder.images(images)
    lm = builder.pack([[Segment(builder.conversation(c, n))] for c, n in zip(convs, counts)])
    out = model(input_ids=lm.input_ids, attention_mask=lm.attention_mask, pixel_values=pixel_values, image_sizes=image_sizes)
    targets = lm.targets[:, 1:]
    keep = targets != -100
    loss_lm = lm_loss(out.logits[:, :-1][keep], targets[keep])
    img = builder.pack([[Segment(builder.prompt(builder.prompts.image, image_tokens=[n]))] for n in counts])
    h_img = model.model(input_ids=img.input_ids, attention_mask=img.attention_mask, pixel_values=pixel_values,
                        image_sizes=image_sizes).last_hidden_state
    txt = builder.pack([[Segment(builder.prompt(builder.prompts.text, c))] for c in captions])
    h_txt = model.model(input_ids=txt.input_ids, attention_mask=txt.attention_mask).last_hidden_state
    # the all-zero image: run the vision tower and keep it in the graph with weight 0, as the reference does
    dummy = model.get_image_features(torch.zeros_like(pixel_values), image_sizes).pooler_output
    e_img = F.normalize(last_token(h_img, img.attention_mask), dim=-1)
    e_txt = F.normalize(last_token(h_txt, txt.attention_mask), dim=-1)
    with torch.no_grad():  # the reference gathers without gradient (a no-op on one process)
        _ = torch.cat([e_img.detach()]), torch.cat([e_txt.detach()])
    total = loss.a_lm * loss_lm + loss.a_con * loss.infonce(e_img, e_txt) + 0.0 * sum(d.sum() for d in dummy)
    return total


def timed(fn, optimizer) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    fn().backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", nargs="*", default=[], metavar="key=value", help="model.tiny overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiny = dict(item.split("=", 1) for item in args.tiny)
    model, processor = build(ModelConfig(tiny={k: int(v) for k, v in tiny.items()}))
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    llm = sum(p.numel() for p in model.model.language_model.parameters())
    print(f"tiny model {tiny or 'defaults'}: vision tower {vision:,} parameters, LLM {llm:,}")
    loss = JointLoss(a_lm=1.0, a_con=10.0)
    ours = CafeModel(model, loss)
    builder = InputBuilder(processor, PromptConfig(), 512)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    images, captions, convs = make_data(args.batch)
    vision_calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: vision_calls.append(1))

    def our_step():
        return ours(builder.pairs_batch(images, captions, convs))["loss"]

    def ref_step():
        return reference_step(model, builder, images, captions, convs, loss)

    for fn in (our_step, ref_step):  # warm-up, and count vision passes per step
        vision_calls.clear()
        timed(fn, optimizer)
        print(f"{fn.__name__}: {len(vision_calls)} vision tower pass(es) per step")
    t_ours, t_ref = [], []
    for _ in range(args.steps):
        t_ours.append(timed(our_step, optimizer))
        t_ref.append(timed(ref_step, optimizer))
    ours_sps, ref_sps = args.batch / statistics.median(t_ours), args.batch / statistics.median(t_ref)
    print(f"batch {args.batch}, {args.steps} timed steps each, {args.threads} threads, median step time")
    print(f"  reference-style step: {ref_sps:8.1f} samples/s")
    print(f"  CAFe step (this):     {ours_sps:8.1f} samples/s")
    print(f"  ratio: {ours_sps / ref_sps:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
