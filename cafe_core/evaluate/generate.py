"""Batched greedy generation for the generative benchmarks (POPE, captions, multiple choice).

The prompt is the chat template the model was trained with: system turn, a user turn of `<image>\\n` +
the question, then the generation prompt `<|im_start|>assistant\\n`. Rows are left-padded so every answer
starts at the same column; decoding is greedy and stops at `<|im_end|>` (the end of an assistant turn).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from cafe_core.model.inputs import InputBuilder, Segment, TokenSeq, turn
from cafe_core.prompts import IM_END, IM_START, IMAGE_TOKEN


def chat_prompt(system: str, question: str) -> str:
    user = question if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n{question}"
    return turn("system", system) + turn("user", user) + f"{IM_START}assistant\n"


def batches(n: int, size: int) -> Iterable[range]:
    return (range(i, min(i + size, n)) for i in range(0, n, size))


@torch.no_grad()
def generate_answers(
    model, builder: InputBuilder, items: Sequence[tuple[str, bytes]], max_new_tokens: int, batch_size: int,
    desc: str = "generate", progress: bool = True,
) -> list[str]:
    """Greedy answers to (question, image) items, in order."""
    if builder.padding_side != "left":
        raise ValueError("generation needs a left-padding InputBuilder (answers start at one column)")
    tokenizer = builder.tokenizer
    stop = [tokenizer.convert_tokens_to_ids(IM_END)]
    if tokenizer.eos_token_id is not None:
        stop.append(tokenizer.eos_token_id)
    device = next(model.parameters()).device
    answers: list[str] = []
    for rows in tqdm(list(batches(len(items), batch_size)), desc=desc, disable=not progress, unit="batch"):
        pixel_values, image_sizes, counts = builder.images([items[i][1] for i in rows])
        seqs = [[Segment(TokenSeq(builder.expand_images(builder.encode(chat_prompt(builder.prompts.system, items[i][0])), [n])))]
                for i, n in zip(rows, counts)]
        batch = builder.pack(seqs)
        out = model.generate(
            input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
            pixel_values=pixel_values.to(device, model.dtype), image_sizes=image_sizes.to(device),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=builder.pad_id,
        )
        new = out[:, batch.input_ids.shape[1]:]
        answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers
