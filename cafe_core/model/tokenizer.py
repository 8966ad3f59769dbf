"""The project's own tokenizer: a byte-level BPE trained here, in code, with Qwen2's special tokens.

No weights or vocabularies are downloaded: the tiny preset needs a tokenizer that is small (the embedding
matrix is vocab x hidden) yet encodes any text, like Qwen2's. Byte-level BPE gives both: every byte is in the
base alphabet, and merges are learnt from a fixed corpus of the project's own text (chat template pieces,
embedding prompts, shapes-world captions and questions), so that domain text takes few tokens.

The corpus, the pre-tokenizer and the trainer are all fixed, so the same ``vocab_size`` always gives a
byte-identical ``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from cafe_core.data.shapes import (
    CLASSES,
    COLOURS,
    LETTERS,
    NUMBER_WORDS,
    POSITION_PHRASES,
    SHAPE_SYNONYMS,
    SHAPES,
    SIZES,
    colour_choice,
    count_choice,
    detailed_caption,
    presence_question,
    sample_scene,
    shape_choice,
    short_captions,
    unique_shape_objects,
)
from cafe_core.prompts import ENDOFTEXT, IM_END, IM_START, IMAGE_PROMPT, IMAGE_TOKEN, SYSTEM, TEXT_PROMPT, VIDEO_TOKEN

# Order fixes their ids (0..4): trained tokenizers list special tokens first.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN)

# qwen_1_5: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, a default system turn, and the
# assistant header as generation prompt. List content (the processor's format) renders images and videos
# first, one placeholder line each, then the text parts.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}{{- '<video>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Qwen2's pre-tokenization: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, spaces. Splitting digits one by one keeps numbers compositional.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_CORPUS_SEED = 20250325
_CORPUS_SCENES = 300
# Prompts and instructions used across the pipeline (training, embedding, POPE, MMStar, MMEB).
_FIXED_TEXT: tuple[str, ...] = (
    SYSTEM,
    IMAGE_PROMPT,
    TEXT_PROMPT,
    "Describe the image in detail.",
    "Describe this image.",
    "What is in the image?",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Represent the given image for classification",
    "Represent the given image with the following question",
    "Represent the given image.",
    "Represent the given text.",
    "Find an image that matches the given caption",
    "Select the portion of the image that isolates the",
    "Options:",
    "Yes",
    "No",
    "yes",
    "no",
    "The answer is",
)
# Everyday caption English (people, animals, objects, places, actions), so that photo datasets such as
# COCO or Flickr30K do not fall back to one token per byte.
_GENERAL_WORDS = """
the a an of and to in is are was were be been being it its this that these those there here with on at by
for from as into onto over under above below between behind beside near next front back top bottom left
right middle center side corner edge around through across along up down out off inside outside
man woman men women person people boy girl child children baby player group crowd family friend
dog dogs cat cats horse horses bird birds cow cows sheep elephant elephants giraffe zebra bear animal
animals car cars truck bus train bicycle bike motorcycle airplane plane boat street road sidewalk city
building house window door wall floor roof sign light traffic table chair couch bed desk kitchen room
bathroom toilet sink mirror shelf computer laptop phone keyboard television screen book books clock vase
cup bottle glass plate bowl food pizza sandwich cake fruit banana apple orange tree trees grass field park
beach ocean water sea lake river snow mountain hill sky cloud clouds sun rain sitting standing walking
running riding playing holding eating looking wearing lying flying parked waiting carrying throwing
catching smiling talking watching jumping small large big little tall short long young old white black
brown gray grey pink dark bright colorful empty full open closed several many some two three four one
other each another every shirt hat jacket dress shoes bag umbrella ball frisbee kite skateboard surfboard
skis racket bat glove photo picture image scene view close shot background foreground object objects
shape shapes drawing painting style simple plain detailed what which who where when why how does do did
can could would should will shall may might must not no yes color colour colours colors size number count
question answer option choice word sentence caption describe description represent retrieve match find
select
"""


def _domain_words() -> list[str]:
    numbers = [str(n) for n in range(101)]
    letters = [*LETTERS, *(f"{letter}." for letter in LETTERS)]
    synonyms = [word for words in SHAPE_SYNONYMS.values() for word in words]
    return [*COLOURS, *SHAPES, *CLASSES, *SIZES, *NUMBER_WORDS, *POSITION_PHRASES.values(), *synonyms,
            *numbers, *letters]


def _chat_lines(user: str, answer: str) -> str:
    return (f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{user}{IM_END}\n"
            f"{IM_START}assistant\n{answer}{IM_END}\n{ENDOFTEXT}")


def corpus() -> Iterator[str]:
    """The training text: fixed prompts, the domain's words, and captions and questions of seeded scenes."""
    yield from _FIXED_TEXT
    yield " ".join(_domain_words())
    yield " ".join(_GENERAL_WORDS.split())
    yield " ".join(word.capitalize() for word in _GENERAL_WORDS.split())
    yield _chat_lines(f"{IMAGE_TOKEN}\n{IMAGE_PROMPT}", "")
    rng = np.random.default_rng(_CORPUS_SEED)
    for i in range(_CORPUS_SCENES):
        scene = sample_scene(rng)
        caption = detailed_caption(scene, rng)
        yield _chat_lines(f"{IMAGE_TOKEN}\nDescribe the image in detail.", caption)
        for short in short_captions(scene, rng, 3):
            yield _chat_lines(f"{short}{TEXT_PROMPT}", "")
        yield f"{presence_question(scene.classes()[0])} {'Yes' if i % 2 else 'No'}"
        answer_index = i % len(LETTERS)
        choices = [count_choice(scene, rng, answer_index), shape_choice(scene, rng, answer_index)]
        if unique_shape_objects(scene):
            choices.append(colour_choice(scene, rng, answer_index))
        for choice in choices:
            yield f"{choice.text()}\n{choice.answer}"


def _backend(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train the project tokenizer with exactly ``vocab_size`` entries (special tokens included)."""
    backend = _backend(vocab_size)
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the built-in corpus supports a tokenizer of at most {backend.get_vocab_size()} tokens, "
            f"not {vocab_size}: lower model.tiny.vocab_size"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        # The image/video placeholders are additional special tokens, so they are never split or merged.
        extra_special_tokens=[IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
