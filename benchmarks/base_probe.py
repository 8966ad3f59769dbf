"""How fast a tiny base learns to read the image, per kind of question: the probe behind configs/base.yaml.

    .venv/bin/python benchmarks/base_probe.py --steps 2000 --kinds presence,choice,grounding
    .venv/bin/python benchmarks/base_probe.py --kinds shape1,colour1 --init-std 0.09 --set text_hidden=192

One process, no DeepSpeed, no files: fresh scenes every step (the shapes world's, as the instruction split
draws them), the LM loss only, AdamW with warm-up and cosine decay, the project's model class, input builder
and model forward. Every --every steps it prints, per kind, the accuracy of the first answer token on 96
fixed held-out questions: the signal that the loss hides (a model that ignores the image still reaches a low
loss on the answers' template). Kinds: the instruction split's presence (POPE's wording; chance 0.5), choice
(multiple choice; 0.25) and grounding (first word of the position; ~0.5), "multi" (rows of --questions
questions of those kinds, as the split writes them; trained on, not scored), two single-object probes,
shape1 ("What shape is it?", 1/6) and colour1 (1/6), and bind ("What colour is the star?" in a scene of 2-3
objects: the binding presence needs, without its yes/no; a colour's first letter is its first token).
Results: docs/base-model.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cafe_core.config import ModelConfig, PromptConfig, TinyModelConfig  # noqa: E402
from cafe_core.data import instruct  # noqa: E402
from cafe_core.data.shapes import render, sample_scene, unique_shape_objects  # noqa: E402
from cafe_core.model.build import build  # noqa: E402
from cafe_core.model.inputs import InputBuilder, Segment  # noqa: E402
from cafe_core.model.joint import CafeModel  # noqa: E402
from cafe_core.prompts import IMAGE_TOKEN  # noqa: E402

EVAL_ITEMS = 96


def sample(rng: np.random.Generator, kind: str, questions: int) -> tuple:
    """(scene, [(question, answer), ...]) of one kind."""
    if kind in ("shape1", "colour1"):
        scene = sample_scene(rng, 1)
        obj = scene.objects[0]
        return scene, [("What shape is it?", obj.shape.capitalize()) if kind == "shape1"
                       else ("What colour is the shape?", obj.colour.capitalize())]
    scene = next(instruct.instruct_scenes(rng))
    if kind == "bind":  # an attribute of the object named by the other one: binding, without letters
        while not unique_shape_objects(scene) or len(scene.objects) < 2:
            scene = next(instruct.instruct_scenes(rng))
        return scene, [instruct.bind(scene, rng)]
    if kind == "multi":
        yes = [bool(v) for v in rng.permutation(np.arange(questions) % 2)]
        letters = [int(v) for v in rng.integers(0, 4, questions)]
        return scene, instruct.question_turns(scene, rng, questions, yes, letters)
    if kind == "presence":
        return scene, [instruct.presence(scene, bool(rng.integers(2)), rng)]
    if kind == "choice":
        return scene, [instruct.choice(scene, rng, int(rng.integers(4)))]
    if kind == "grounding":
        return scene, [instruct.grounding(scene, rng)]
    raise SystemExit(f"unknown kind {kind!r}")


def batch(builder: InputBuilder, items: list, image_size: int):
    pixel_values, sizes, counts = builder.images([render(scene, image_size) for scene, _ in items])
    rows = []
    for (_, turns), n in zip(items, counts):
        conversation = []
        for i, (question, answer) in enumerate(turns):
            conversation += [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}" if i == 0 else question},
                             {"from": "gpt", "value": answer}]
        rows.append([Segment(builder.conversation(conversation, n))])
    return builder.pack(rows, pixel_values=pixel_values, image_sizes=sizes, image_rows_for=list(range(len(rows))))


def first_token_accuracy(model: CafeModel, builder: InputBuilder, items: list, image_size: int) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(items), 32):
            b = batch(builder, items[i:i + 32], image_size)
            hidden, targets = model.hidden_states(b)[:, :-1], b.targets[:, 1:]
            for row in range(targets.shape[0]):
                at = int((targets[row] != -100).nonzero()[0])
                correct += int(model.hf.lm_head(hidden[row, at]).argmax() == targets[row, at])
    return correct / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--kinds", default="presence,choice,grounding", help="trained on, comma-separated")
    ap.add_argument("--score", default="presence,choice,grounding", help="scored kinds (not multi)")
    ap.add_argument("--questions", type=int, default=4, help="questions in a 'multi' row")
    ap.add_argument("--init-std", type=float, default=None, help="model.tiny.init_std (default: 0.02)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=INT", help="model.tiny fields, e.g. text_layers=4")
    args = ap.parse_args()

    tiny = TinyModelConfig(init_std=args.init_std, **{k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    hf, processor = build(ModelConfig(tiny=tiny))
    builder = InputBuilder(processor, PromptConfig(), 512)
    model = CafeModel(hf)
    print(f"{sum(p.numel() for p in hf.parameters()) / 1e6:.2f} M parameters; {vars(args)}", flush=True)
    opt = torch.optim.AdamW(hf.parameters(), lr=args.lr)
    warmup = max(1, args.steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    held = np.random.default_rng(123)
    scored = {k: [sample(held, k, args.questions) for _ in range(EVAL_ITEMS)] for k in args.score.split(",")}
    kinds = args.kinds.split(",")
    rng = np.random.default_rng(0)
    started, smooth = time.monotonic(), None
    for step in range(1, args.steps + 1):
        items = [sample(rng, kinds[int(rng.integers(len(kinds)))], args.questions) for _ in range(args.batch)]
        b = batch(builder, items, args.image_size)
        logits, targets = model.lm_logits(model.hidden_states(b), b)
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        sched.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % args.every == 0 or step == args.steps:
            model.eval()
            acc = {k: round(first_token_accuracy(model, builder, v, args.image_size), 3) for k, v in scored.items()}
            model.train()
            print(f"step {step}  {time.monotonic() - started:.0f} s  loss {smooth:.3f}  {acc}", flush=True)


if __name__ == "__main__":
    main()
