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
from cafe_core.prompts import IM_END, IM_START, IMAGE_TOKEN

ROLE = {"human": "user", "gpt": "assistant", "system": "system"}
BLANK_SIDE = 32  # pixels of the blank image a batch without images carries (InputBuilder.interleaved_pairs_batch)


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


def blank_image() -> Image.Image:
    """What a batch without images carries so that the vision tower still runs (its features weigh 0)."""
    return Image.new("RGB", (BLANK_SIDE, BLANK_SIDE))


def with_placeholder(text: str, has_image: bool) -> str:
    """An interleaved input's text as the model reads it: an image without an <image> placeholder goes first."""
    return f"{IMAGE_TOKEN}\n{text}" if has_image and IMAGE_TOKEN not in text else text


@dataclass(frozen=True)
class Side:
    """One side of an interleaved pair: user text (with <image> where its image goes) and the image, if any."""

    text: str
    image: bytes | Image.Image | None = None


@dataclass(frozen=True)
class InterleavedPair:
    """A query, its target and optionally a hard negative (an extra candidate the query must not match)."""

    query: Side
    target: Side
    negative: Side | None = None


def interleaved_pair(row: dict, pair_query: str) -> InterleavedPair:
    """A converted pair (a row of `cafe convert`'s shards) as interleaved training reads it: an MMEB-train
    pair's own sides, or an image-caption pair's image with `pair_query` (train.prompts.pair_query) against
    its caption."""
    if row.get("query_text") is None:
        return InterleavedPair(Side(pair_query, row["image"]), Side(row["caption"]))
    negative = None if row.get("negative_text") is None else Side(row["negative_text"], row["negative_image"])
    return InterleavedPair(Side(row["query_text"], row["query_image"]), Side(row["target_text"], row["target_image"]),
                           negative)


@dataclass
class TokenSeq:
    ids: list[int]
    targets: list[int] | None = None  # aligned with ids; IGNORE_INDEX where no loss


@dataclass
class Segment:
    """A sequence placed in a packed row. It attends causally to itself and, when `prefix` > 0, to the
    first `prefix` tokens of its row (a shared prompt prefix whose hidden states it reuses); its
    positions start at `start`. `pool` names the embedding read at its last token."""

    seq: TokenSeq
    start: int = 0
    prefix: int = 0
    pool: str | None = None


@dataclass
class Batch:
    """Padded model inputs. `pool[name]` = (rows, columns) of the tokens whose final hidden states are
    the named embeddings. Image placeholder blocks take image features in reading order (row by row,
    left to right); `image_rows_for[k]` is the image (index into pixel_values) of the k-th block.
    `attention_4d` is set when rows pack several segments (block-causal); otherwise the 2-D mask holds.
    `groups` = (first row, end row, width): row groups the LLM reads in separate passes, each only as wide
    as its longest row (so short rows are not padded to the longest of the batch; attention is quadratic).
    `negative_of[k]` is the pair of the k-th hard negative (pool "n"); None: the batch has no negatives slot.
    `pixel_values` with no `image_rows_for` is a blank image that only keeps the vision tower in the step."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    pool: dict[str, tuple[Tensor, Tensor]]
    targets: Tensor | None = None
    attention_4d: Tensor | None = None
    pixel_values: Tensor | None = None
    image_sizes: Tensor | None = None
    image_rows_for: list[int] = field(default_factory=list)
    groups: list[tuple[int, int, int]] = field(default_factory=list)
    negative_of: list[int] | None = None

    def to(self, device: torch.device | str) -> "Batch":
        def move(t):
            return None if t is None else t.to(device)

        return Batch(
            input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
            position_ids=move(self.position_ids),
            pool={k: (move(r), move(c)) for k, (r, c) in self.pool.items()},
            targets=move(self.targets), attention_4d=move(self.attention_4d),
            pixel_values=move(self.pixel_values), image_sizes=move(self.image_sizes),
            image_rows_for=self.image_rows_for, groups=self.groups, negative_of=self.negative_of,
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
        self._template_ids: dict[str, tuple[list[int], list[int]]] = {}  # rendered template -> (before, after) ids

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
        """An embedding prompt, tokenised as one string as the reference does: the caption runs into
        "Compress ..." with no separator, Qwen2's pre-tokenizer makes one piece of a caption's final "." (or
        last word) and "Compress", and BPE may merge across the seam. A text too long for max_length is cut,
        never the instruction around it (then encoded apart)."""
        rendered = embedding_prompt(self.prompts, template)
        if text is None or "{text}" not in rendered:
            return TokenSeq(self.expand_images(self.encode(rendered), image_tokens))
        extra = sum(image_tokens) - len(image_tokens)  # placeholders grow into image tokens
        joined = self.encode(rendered.replace("{text}", text, 1))
        if len(joined) + extra <= self.max_length:
            return TokenSeq(self.expand_images(joined, image_tokens))
        if rendered not in self._template_ids:  # the instruction around {text} is the same for every item
            self._template_ids[rendered] = tuple(self.encode(part) for part in rendered.split("{text}", 1))
        before, after = self._template_ids[rendered]
        body = self.encode(text)
        budget = self.max_length - len(before) - len(after) - extra
        if budget < 1:
            raise InputError(f"prompt template alone is over train.max_length={self.max_length} tokens")
        return TokenSeq(self.expand_images(before + body[:budget] + after, image_tokens))

    # -- batches
    def pack(self, rows: Sequence[Sequence[Segment]], groups: Sequence[int] = (), **extra) -> Batch:
        """Pad rows of segments into one batch. Single-segment rows use the 2-D mask (either padding
        side); rows with several segments get a block-causal 4-D mask (right padding). `groups` splits the
        rows, in order, into groups of these sizes that the model reads separately (see Batch.groups)."""
        lengths = [sum(len(seg.seq.ids) for seg in row) for row in rows]
        width = max(lengths)
        n = len(rows)
        sizes = list(groups) or [n]
        if sum(sizes) != n:
            raise ValueError(f"groups {sizes} do not add up to {n} rows")
        bounds = [(sum(sizes[:g]), sum(sizes[: g + 1])) for g in range(len(sizes))]
        spans = [(a, b, max(lengths[a:b])) for a, b in bounds if b > a]
        group_width = [w for a, b, w in spans for _ in range(a, b)]
        packed = any(len(row) > 1 or row[0].prefix or row[0].start for row in rows)
        left = self.padding_side == "left" and not packed
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        has_targets = any(seg.seq.targets is not None for row in rows for seg in row)
        targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long) if has_targets else None
        allowed = torch.zeros((n, width, width), dtype=torch.bool) if packed else None
        pool: dict[str, tuple[list[int], list[int]]] = {}
        for i, row in enumerate(rows):
            at = group_width[i] - lengths[i] if left else 0
            for seg in row:
                k = len(seg.seq.ids)
                span = slice(at, at + k)
                ids[i, span] = torch.tensor(seg.seq.ids)
                mask[i, span] = 1
                positions[i, span] = torch.arange(seg.start, seg.start + k)
                if targets is not None and seg.seq.targets is not None:
                    targets[i, span] = torch.tensor(seg.seq.targets)
                if allowed is not None:
                    allowed[i, span, span] = torch.tril(torch.ones(k, k, dtype=torch.bool))
                    allowed[i, span, : seg.prefix] = True
                if seg.pool:
                    pool.setdefault(seg.pool, ([], []))
                    pool[seg.pool][0].append(i)
                    pool[seg.pool][1].append(at + k - 1)
                at += k
            if allowed is not None:  # padding attends to itself only: no fully masked (NaN) rows
                pad = torch.arange(lengths[i], width)
                allowed[i, pad, pad] = True
        return Batch(
            input_ids=ids, attention_mask=mask, position_ids=positions, targets=targets,
            attention_4d=None if allowed is None else allowed.unsqueeze(1),
            pool={k: (torch.tensor(r), torch.tensor(c)) for k, (r, c) in pool.items()}, groups=spans, **extra,
        )

    def pairs_batch(
        self, images: Sequence[bytes], captions: Sequence[str], conversations: Sequence[Sequence[dict]] | None,
        ids: Sequence[str] = (), mode: str = "pairs",
    ) -> Batch:
        """One training batch of B pairs: B packed rows of the LM conversation (when given) with the
        image-embedding prompt, then B rows of the caption's text-embedding prompt, read as two row groups.
        Each image is processed once. The image prompt begins with the same tokens as the conversation
        (the system turn and the user turn's opening image, the LLaVA convention) and reuses their hidden
        states: only its remaining tokens are added, attending to that shared prefix, so the LLM reads each
        image's tokens once. The result is exactly that of separate forwards. mode="interleaved": the pairs as
        interleaved_pairs_batch reads them (image_caption_pair)."""
        if mode == "interleaved":
            pairs = [self.image_caption_pair(image, caption) for image, caption in zip(images, captions)]
            return self.interleaved_pairs_batch(pairs, conversations, ids)
        pixel_values, image_sizes, counts = self.images(images)
        names = list(ids) or [str(i) for i in range(len(images))]
        rows: list[list[Segment]] = []
        text_rows: list[list[Segment]] = []
        for i, (n, caption) in enumerate(zip(counts, captions)):
            image_prompt, text_prompt = self.pair_prompts(n, caption, mode)
            if conversations is None:
                rows.append([Segment(image_prompt, pool="a")])
            else:
                conv = self.conversation(conversations[i], n, names[i])
                rows.append([Segment(conv), self.after_shared(conv, image_prompt, "a")])
            text_rows.append([Segment(text_prompt, pool="b")])
        image_rows = [i for i, row in enumerate(rows) for seg in row if self.image_token_id in seg.seq.ids]
        return self.pack(rows + text_rows, groups=[len(rows), len(text_rows)], pixel_values=pixel_values,
                         image_sizes=image_sizes, image_rows_for=image_rows)

    def image_caption_pair(self, image: bytes | Image.Image, caption: str) -> InterleavedPair:
        """An image-caption pair as interleaved mode reads it: the image with prompts.pair_query, the caption."""
        return interleaved_pair({"image": image, "caption": caption}, self.prompts.pair_query)

    def interleaved_pairs_batch(
        self, pairs: Sequence[InterleavedPair], conversations: Sequence[Sequence[dict] | None] | None = None,
        ids: Sequence[str] = (), negatives: bool = False,
    ) -> Batch:
        """A training batch of B interleaved pairs (train.loss.mode=interleaved): B query rows (packed after
        the pair's LM conversation when it has one, reusing its prefix as pairs_batch does; the conversation's
        image is the query's), then one row group of the B targets and, with `negatives`, one row per hard
        negative (pool "n", `negative_of` naming its pair; every batch of such a run carries the slot, even
        empty, so that all ranks gather alike). Each side reads its own text and image through
        prompts.interleaved; every image is processed once. A batch without any image carries one blank image
        that the model reads and weighs 0, so the vision tower runs on every rank (ZeRO-3 gathers in step)."""
        n = len(pairs)
        names = list(ids) or [str(i) for i in range(n)]
        negative_of = [i for i, p in enumerate(pairs) if p.negative is not None] if negatives else None
        sides = [p.query for p in pairs] + [p.target for p in pairs] + [pairs[i].negative for i in negative_of or []]
        with_image = [s.image for s in sides if s.image is not None]
        pixel_values, image_sizes, counts = self.images(with_image or [blank_image()])
        image_of: list[int | None] = []  # the image (index into pixel_values) of each side
        seqs: list[TokenSeq] = []
        for s in sides:
            k = None if s.image is None else len(image_of) - image_of.count(None)
            image_of.append(k)
            text = with_placeholder(s.text, k is not None)
            seqs.append(self.prompt(self.prompts.interleaved, text, image_tokens=[] if k is None else [counts[k]]))
        rows: list[list[Segment]] = []
        for i in range(n):
            conv = None if conversations is None else conversations[i]
            if conv is None:
                rows.append([Segment(seqs[i], pool="a")])
                continue
            if image_of[i] is None:
                raise InputError(f"record {names[i]!r}: its conversation needs an image on the query side")
            full = self.conversation(conv, counts[image_of[i]], names[i])
            rows.append([Segment(full), self.after_shared(full, seqs[i], "a")])
        rows += [[Segment(seq, pool="b" if j < 2 * n else "n")] for j, seq in enumerate(seqs[n:], start=n)]
        # Rows are in side order: each image block of row j is side j's image.
        image_rows = [image_of[j] for j, row in enumerate(rows) for seg in row
                      for _ in range(self.image_blocks(seg.seq.ids))]
        return self.pack(rows, groups=[n, len(rows) - n], pixel_values=pixel_values, image_sizes=image_sizes,
                         image_rows_for=image_rows if with_image else [], negative_of=negative_of)

    def image_blocks(self, ids: Sequence[int]) -> int:
        """How many runs of image tokens `ids` holds."""
        image = self.image_token_id
        return sum(t == image and (j == 0 or ids[j - 1] != image) for j, t in enumerate(ids))

    def pair_prompts(self, image_tokens: int, caption: str, mode: str) -> tuple[TokenSeq, TokenSeq]:
        """The two sides of a pair: "Compress" prompts (pairs mode) or MMEB-style inputs (interleaved)."""
        if mode == "interleaved":
            query = self.prompt(self.prompts.interleaved, self.prompts.pair_query, image_tokens=[image_tokens])
            return query, self.prompt(self.prompts.interleaved, caption)
        return self.prompt(self.prompts.image, image_tokens=[image_tokens]), self.prompt(self.prompts.text, caption)

    def after_shared(self, first: TokenSeq, seq: TokenSeq, pool: str) -> Segment:
        """`seq` as a segment that reuses its longest common prefix with `first` (never a part of an image
        block, and at least one token of its own to pool)."""
        k = 0
        limit = min(len(first.ids), len(seq.ids) - 1)
        while k < limit and first.ids[k] == seq.ids[k]:
            k += 1
        image = self.image_token_id
        while 0 < k < len(seq.ids) and seq.ids[k] == image and seq.ids[k - 1] == image:
            k -= 1  # the cut falls inside an image block: keep the whole block in this segment
        return Segment(TokenSeq(seq.ids[k:]), start=k, prefix=k, pool=pool)

    def images_batch(self, images: Sequence[bytes | Image.Image], mode: str = "pairs") -> Batch:
        pixel_values, image_sizes, counts = self.images(images)
        rows = [[Segment(self.pair_prompts(n, "", mode)[0], pool="a")] for n in counts]
        return self.pack(rows, pixel_values=pixel_values, image_sizes=image_sizes, image_rows_for=list(range(len(rows))))

    def texts_batch(self, texts: Sequence[str], mode: str = "pairs") -> Batch:
        return self.pack([[Segment(self.pair_prompts(0, t, mode)[1], pool="a")] for t in texts])

    def interleaved_batch(
        self, items: Sequence[tuple[str, bytes | Image.Image | None]], always_vision: bool = False
    ) -> Batch:
        """MMEB-style inputs: the user text (with <image> where it has an image) as the prompt itself.
        `always_vision`: items without any image carry a blank image (see interleaved_pairs_batch)."""
        with_image = [img for _, img in items if img is not None]
        pixel_values = image_sizes = None
        counts: list[int] = []
        if with_image:
            pixel_values, image_sizes, counts = self.images(with_image)
        elif always_vision:
            pixel_values, image_sizes, _ = self.images([blank_image()])
        seqs, rows, k = [], [], 0
        for text, img in items:
            text = with_placeholder(text, img is not None)
            n = [counts[k]] if img is not None else []
            seqs.append([Segment(self.prompt(self.prompts.interleaved, text, image_tokens=n), pool="a")])
            if img is not None:
                rows.append(k)
                k += 1
        return self.pack(seqs, pixel_values=pixel_values, image_sizes=image_sizes, image_rows_for=rows)
