"""Token sequences and batches: the LM conversation, the embedding prompts, images, padding.

Prompts follow the `qwen_1_5` chat template (`<|im_start|>{role}\\n{content}<|im_end|>\\n`). Each `<image>`
placeholder is expanded to the number of image tokens the model consumes for that image's size (the
processor's own count), so features and placeholders always match.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor

from cafe_core.config import PromptConfig
from cafe_core.loss import IGNORE_INDEX

IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


class InputError(ValueError):
    """A record cannot be turned into model inputs; the message names the record and the limit."""


def open_rgb(data: bytes | Image.Image) -> Image.Image:
    image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    return image.convert("RGB")


def turn(role: str, content: str) -> str:
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def embedding_prompt(prompts: PromptConfig, user: str) -> str:
    """system + user turn + generation prompt + the configured suffix (the reference's <|im_end|>)."""
    return turn("system", prompts.system) + turn("user", user) + f"{IM_START}assistant\n" + prompts.assistant_suffix


@dataclass
class TokenSeq:
    ids: list[int]
    targets: list[int] | None = None  # aligned with ids; IGNORE_INDEX where no loss


@dataclass
class Batch:
    """Padded model inputs. `groups` names row ranges, e.g. {"lm": (0, 4), "a": (4, 8), "b": (8, 12)}.
    Rows with image placeholders take the image features in row order; `image_rows_for` says which
    image (index into pixel_values) each such row uses."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    groups: dict[str, tuple[int, int]]
    targets: Tensor | None = None
    pixel_values: Tensor | None = None
    image_sizes: Tensor | None = None
    image_rows_for: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        def move(t):
            if t is None:
                return None
            t = t.to(device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return Batch(
            input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
            position_ids=move(self.position_ids), groups=self.groups, targets=move(self.targets),
            pixel_values=move(self.pixel_values), image_sizes=move(self.image_sizes),
            image_rows_for=self.image_rows_for,
        )

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


class InputBuilder:
    """Turns records into Batches for one processor (tokenizer + image processor) and prompt set."""

    def __init__(self, processor: Any, prompts: PromptConfig, max_length: int, padding_side: str = "right"):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompts = prompts
        self.max_length = max_length
        self.padding_side = padding_side
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # -- pieces
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def expand_images(self, ids: list[int], counts: Sequence[int]) -> list[int]:
        """Replace the k-th image placeholder by counts[k] image tokens."""
        out, k = [], 0
        for t in ids:
            if t == self.image_token_id:
                if k >= len(counts):
                    raise InputError(f"more {IMAGE_TOKEN} placeholders than images ({len(counts)})")
                out.extend([t] * counts[k])
                k += 1
            else:
                out.append(t)
        if k != len(counts):
            raise InputError(f"{k} {IMAGE_TOKEN} placeholder(s) for {len(counts)} image(s)")
        return out

    def images(self, images: Sequence[bytes | Image.Image]) -> tuple[Tensor, Tensor, list[int]]:
        rgb = [open_rgb(i) for i in images]
        out = self.processor.image_processor(rgb, return_tensors="pt")
        sizes = [(im.height, im.width) for im in rgb]
        counts = self.processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
        return out["pixel_values"], out["image_sizes"], list(counts)

    def conversation(self, conversations: Sequence[dict], n_image_tokens: int, record: str = "") -> TokenSeq:
        """The full conversation for the LM loss: assistant answers (and their <|im_end|>) are targets;
        system, user and role headers are masked."""
        turns = list(conversations)
        if not any(IMAGE_TOKEN in t["value"] for t in turns if t["from"] == "human"):
            first = next((i for i, t in enumerate(turns) if t["from"] == "human"), None)
            if first is None:
                turns.insert(0, {"from": "human", "value": IMAGE_TOKEN})
            else:
                turns[first] = {"from": "human", "value": f"{IMAGE_TOKEN}\n{turns[first]['value']}"}
        ids: list[int] = self.encode(turn("system", self.prompts.system))
        targets: list[int] = [IGNORE_INDEX] * len(ids)
        for t in turns:
            role = ROLE[t["from"]]
            if role == "assistant":
                head, body, tail = self.encode(f"{IM_START}assistant\n"), self.encode(f"{t['value']}{IM_END}"), self.encode("\n")
                ids += head + body + tail
                targets += [IGNORE_INDEX] * len(head) + body + [IGNORE_INDEX] * len(tail)
            else:
                piece = self.encode(turn(role, t["value"]))
                ids += piece
                targets += [IGNORE_INDEX] * len(piece)
        n_placeholders = ids.count(self.image_token_id)
        if n_placeholders != 1:
            raise InputError(f"record {record!r}: conversation has {n_placeholders} {IMAGE_TOKEN} placeholders; pairs take one")
        expanded = self.expand_images(ids, [n_image_tokens])
        where = ids.index(self.image_token_id)
        targets = targets[:where] + [IGNORE_INDEX] * n_image_tokens + targets[where + 1 :]
        if len(expanded) > self.max_length:
            if where + n_image_tokens >= self.max_length:
                raise InputError(
                    f"record {record!r}: the image alone takes {n_image_tokens} tokens, over train.max_length="
                    f"{self.max_length}; raise max_length or lower the image grid"
                )
            expanded, targets = expanded[: self.max_length], targets[: self.max_length]
        return TokenSeq(expanded, targets)

    def prompt(self, template: str, text: str | None = None, image_tokens: Sequence[int] = ()) -> TokenSeq:
        """An embedding prompt; a text too long for max_length is cut, never the instruction around it."""
        rendered = embedding_prompt(self.prompts, template)
        if text is None or "{text}" not in rendered:
            return TokenSeq(self.expand_images(self.encode(rendered), image_tokens))
        before, after = (self.encode(part) for part in rendered.split("{text}", 1))
        body = self.encode(text)
        extra = sum(image_tokens) - len(image_tokens)  # placeholders grow into image tokens
        budget = self.max_length - len(before) - len(after) - extra
        if budget < 1:
            raise InputError(f"prompt template alone is over train.max_length={self.max_length} tokens")
        return TokenSeq(self.expand_images(before + body[:budget] + after, image_tokens))

    # -- batches
    def pad(self, seqs: Sequence[TokenSeq], groups: dict[str, tuple[int, int]], **extra) -> Batch:
        length = max(len(s.ids) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        has_targets = any(s.targets is not None for s in seqs)
        targets = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long) if has_targets else None
        for i, s in enumerate(seqs):
            n = len(s.ids)
            cols = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            ids[i, cols] = torch.tensor(s.ids)
            mask[i, cols] = 1
            if targets is not None and s.targets is not None:
                targets[i, cols] = torch.tensor(s.targets)
        # Positions count real tokens only, so left and right padding give the same result.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return Batch(input_ids=ids, attention_mask=mask, position_ids=positions, groups=groups, targets=targets, **extra)

    def pairs_batch(self, images: Sequence[bytes], captions: Sequence[str], conversations: Sequence[Sequence[dict]] | None, ids: Sequence[str] = ()) -> Batch:
        """One training batch of B pairs: rows [0,B) the LM conversations (when given), then B image
        prompts, then B caption prompts. Each image is processed once and feeds both of its rows."""
        pixel_values, image_sizes, counts = self.images(images)
        names = list(ids) or [str(i) for i in range(len(images))]
        seqs: list[TokenSeq] = []
        groups: dict[str, tuple[int, int]] = {}
        image_rows: list[int] = []
        b = len(images)
        if conversations is not None:
            seqs += [self.conversation(c, n, r) for c, n, r in zip(conversations, counts, names)]
            groups["lm"] = (0, b)
            image_rows += list(range(b))
        start = len(seqs)
        seqs += [self.prompt(self.prompts.image, image_tokens=[n]) for n in counts]
        groups["a"] = (start, start + b)
        image_rows += list(range(b))
        seqs += [self.prompt(self.prompts.text, c) for c in captions]
        groups["b"] = (start + b, start + 2 * b)
        return self.pad(seqs, groups, pixel_values=pixel_values, image_sizes=image_sizes, image_rows_for=image_rows)

    def images_batch(self, images: Sequence[bytes | Image.Image]) -> Batch:
        pixel_values, image_sizes, counts = self.images(images)
        seqs = [self.prompt(self.prompts.image, image_tokens=[n]) for n in counts]
        return self.pad(seqs, {"a": (0, len(seqs))}, pixel_values=pixel_values, image_sizes=image_sizes,
                        image_rows_for=list(range(len(seqs))))

    def texts_batch(self, texts: Sequence[str]) -> Batch:
        seqs = [self.prompt(self.prompts.text, t) for t in texts]
        return self.pad(seqs, {"a": (0, len(seqs))})

    def interleaved_batch(self, items: Sequence[tuple[str, bytes | Image.Image | None]]) -> Batch:
        """MMEB-style inputs: the user text (with <image> where it has an image) as the prompt itself."""
        with_image = [img for _, img in items if img is not None]
        pixel_values = image_sizes = None
        counts: list[int] = []
        if with_image:
            pixel_values, image_sizes, counts = self.images(with_image)
        seqs, rows, k = [], [], 0
        for text, img in items:
            if img is not None and IMAGE_TOKEN not in text:
                text = f"{IMAGE_TOKEN}\n{text}"
            n = [counts[k]] if img is not None else []
            seqs.append(self.prompt(self.prompts.interleaved, text, image_tokens=n))
            if img is not None:
                rows.append(k)
                k += 1
        return self.pad(seqs, {"a": (0, len(seqs))}, pixel_values=pixel_values, image_sizes=image_sizes, image_rows_for=rows)
