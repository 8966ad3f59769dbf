"""The CAFe step on the real tiny LLaVA-OneVision: one vision pass, correct masks and pooling, and the
same loss and gradients whether the batch is on one rank or split over two."""

from __future__ import annotations

from types import SimpleNamespace
from typing import get_args

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cafe_core.config import ModelConfig, PromptConfig
from cafe_core.data.shapes import detailed_caption, png_bytes, render, sample_scene
from cafe_core.loss import IGNORE_INDEX, JointLoss
from cafe_core.model.build import build
from cafe_core.model.inputs import InputBuilder, InputError, Segment, embedding_prompt
from cafe_core.model.joint import CafeModel
from cafe_core.ports import free_port
from cafe_core.prompts import IMAGE_TOKEN

PROMPTS = PromptConfig()
ATTN_IMPLEMENTATIONS = get_args(ModelConfig.model_fields["attn_implementation"].annotation)


def records(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = [png_bytes(render(s, 64)) for s in scenes]
    captions = [detailed_caption(s, rng) for s in scenes]
    convs = [
        [{"from": "human", "value": "<image>\nDescribe the image in detail."}, {"from": "gpt", "value": c},
         {"from": "human", "value": "Is there a red star in the image?"}, {"from": "gpt", "value": "No"}]
        for c in captions
    ]
    return images, captions, convs


@pytest.fixture(scope="module")
def tiny():
    model, processor = build(ModelConfig())
    return model, processor


@pytest.fixture(scope="module", params=ATTN_IMPLEMENTATIONS)
def tiny_attn(request):
    """The tiny model under each allowed model.attn_implementation (eager adds the mask to the scores,
    sdpa reads it: both must mask packed rows and padding)."""
    model, processor = build(ModelConfig(attn_implementation=request.param))
    assert model.config.text_config._attn_implementation == request.param
    return model, processor


def test_one_vision_pass_per_step_and_no_dummy_images(tiny):
    model, processor = tiny
    step = CafeModel(model, JointLoss())
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    images, captions, convs = records(4)
    batch = InputBuilder(processor, PROMPTS, 512).pairs_batch(images, captions, convs)
    out = step(batch)
    out["loss"].backward()
    hook.remove()
    assert len(calls) == 1, "the vision tower must run once per step"
    assert calls[0] == batch.pixel_values.shape[0] * batch.pixel_values.shape[1]  # 4 images' tiles, once
    # each image's tokens are read once: the image prompt reuses the conversation's prefix
    assert batch.image_rows_for == [0, 1, 2, 3]
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((batch.input_ids == image_id).sum()) == sum(InputBuilder(processor, PROMPTS, 512).images(images)[2])
    assert set(out) == {"loss", "loss_lm", "loss_con"} and torch.isfinite(out["loss"])


def test_packed_rows_equal_separate_forwards(tiny_attn):
    """Packing (shared image prefix, block-causal mask) changes nothing: the embeddings and the LM loss
    equal those of separate, unpacked forwards, under every attention implementation."""
    model, processor = tiny_attn
    step = CafeModel(model, JointLoss(a_lm=1.0, a_con=1.0)).eval()
    builder = InputBuilder(processor, PROMPTS, 512)
    images, captions, convs = records(3, seed=5)
    with torch.no_grad():
        packed = builder.pairs_batch(images, captions, convs)
        assert packed.attention_4d is not None
        hidden = step.hidden_states(packed)
        img = step(builder.images_batch(images), mode="embed")
        txt = step(builder.texts_batch(captions), mode="embed")
        torch.testing.assert_close(step.embeddings(hidden, packed, "a"), img, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step.embeddings(hidden, packed, "b"), txt, rtol=1e-4, atol=1e-5)
        pixel_values, image_sizes, counts = builder.images(images)
        alone = builder.pack([[Segment(builder.conversation(c, n))] for c, n in zip(convs, counts)],
                             pixel_values=pixel_values, image_sizes=image_sizes, image_rows_for=[0, 1, 2])
        logits, targets = step.lm_logits(step.hidden_states(alone), alone)
        p_logits, p_targets = step.lm_logits(hidden, packed)
        assert torch.equal(targets, p_targets)
        torch.testing.assert_close(p_logits, logits, rtol=1e-4, atol=1e-4)


def test_lm_targets_are_the_assistant_turns_only(tiny):
    _, processor = tiny
    builder = InputBuilder(processor, PROMPTS, 512)
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red star."},
            {"from": "human", "value": "Is there a circle?"}, {"from": "gpt", "value": "No"}]
    seq = builder.conversation(conv, n_image_tokens=5)
    decode = processor.tokenizer.decode
    targets = [t for t in seq.targets if t != IGNORE_INDEX]
    assert decode(targets) == "A red star.<|im_end|>No<|im_end|>"
    masked = decode([i for i, t in zip(seq.ids, seq.targets) if t == IGNORE_INDEX])
    assert "You are a helpful assistant." in masked and "Describe." in masked and "Is there a circle?" in masked
    assert seq.ids.count(builder.image_token_id) == 5


def test_conversation_without_placeholder_gets_one_and_too_long_images_fail(tiny):
    _, processor = tiny
    builder = InputBuilder(processor, PROMPTS, 64)
    seq = builder.conversation([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], 3)
    assert seq.ids.count(builder.image_token_id) == 3
    with pytest.raises(InputError, match="max_length"):
        builder.conversation([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}], 100, "rec-7")


def test_embedding_prompts_are_the_reference_strings(tiny):
    _, processor = tiny
    builder = InputBuilder(processor, PROMPTS, 512)
    text = processor.tokenizer.decode(builder.prompt(PROMPTS.text, "Two red stars.").ids)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Two red stars.Compress this sentence in one word:<|im_end|>\n<|im_start|>assistant\n<|im_end|>"
    )
    image = processor.tokenizer.decode(builder.prompt(PROMPTS.image, image_tokens=[2]).ids)
    assert "<|im_start|>user\n<image><image>\nCompress this image in one word:<|im_end|>" in image
    long = builder.prompt(PROMPTS.text, "word " * 2000)
    assert len(long.ids) <= 512 and processor.tokenizer.decode(long.ids).endswith("one word:<|im_end|>\n<|im_start|>assistant\n<|im_end|>")


def seam_merging_tokenizer():
    """A byte-level BPE (the Qwen2 family's kind) trained so that a caption's last word merges with the
    instruction after it ("starCompress"): the tokens differ when the two are encoded apart."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a red starCompress this sentence in one word:"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[:3])


def test_text_prompt_is_tokenised_as_one_string_like_the_reference():
    tokenizer = seam_merging_tokenizer()
    builder = InputBuilder(SimpleNamespace(tokenizer=tokenizer), PROMPTS, 512)
    rendered = embedding_prompt(PROMPTS, PROMPTS.text)
    joined = tokenizer(rendered.replace("{text}", "a red star"), add_special_tokens=False)["input_ids"]
    before, after = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in rendered.split("{text}"))
    apart = before + tokenizer("a red star", add_special_tokens=False)["input_ids"] + after
    assert joined != apart  # the seam merges: the test can tell the two encodings apart
    assert builder.prompt(PROMPTS.text, "a red star").ids == joined
    # Too long for max_length: the text is cut, the instruction kept (encoded apart, as it must be then).
    short = InputBuilder(SimpleNamespace(tokenizer=tokenizer), PROMPTS, len(before) + len(after) + 3)
    cut = short.prompt(PROMPTS.text, "a blue circle, " * 20).ids
    assert len(cut) == short.max_length and cut[: len(before)] == before and cut[-len(after):] == after


def test_left_and_right_padding_give_the_same_embeddings(tiny_attn):
    model, processor = tiny_attn
    step = CafeModel(model).eval()
    images, captions, _ = records(3)
    texts = [captions[0], "short", captions[1][:40]]
    with torch.no_grad():
        right = InputBuilder(processor, PROMPTS, 512, padding_side="right")
        left = InputBuilder(processor, PROMPTS, 512, padding_side="left")
        for make in ("texts_batch", "images_batch"):
            items = texts if make == "texts_batch" else images
            r, l = step(getattr(right, make)(items), mode="embed"), step(getattr(left, make)(items), mode="embed")
            torch.testing.assert_close(r, l, rtol=1e-5, atol=1e-5)
            assert torch.allclose(r.norm(dim=-1), torch.ones(3))
        # batching does not change an embedding: alone == inside a padded batch
        alone = step(right.texts_batch(["short"]), mode="embed")[0]
        torch.testing.assert_close(alone, step(right.texts_batch(texts), mode="embed")[1], rtol=1e-5, atol=1e-5)


def test_batched_generation_equals_one_at_a_time(tiny_attn):
    """Generation (2-D mask, left padding, KV cache) under each attention implementation: a padded batch
    answers as each item alone."""
    from cafe_core.evaluate.generate import generate_answers

    model, processor = tiny_attn
    images, _, _ = records(3)
    items = [("Describe the image in detail.", images[0]), ("Is there a red star?", images[1]), ("What?", images[2])]
    builder = InputBuilder(processor, PROMPTS, 512, padding_side="left")
    batched = generate_answers(model.eval(), builder, items, 8, 3, progress=False)
    assert batched == [generate_answers(model, builder, [item], 8, 1, progress=False)[0] for item in items]


# --- world-size invariance on the real model ---------------------------------------------------------


def _loss_and_grads(rows: slice):
    model, processor = build(ModelConfig())
    step = CafeModel(model, JointLoss(a_lm=1.0, a_con=10.0))
    images, captions, convs = records(8, seed=3)
    batch = InputBuilder(processor, PROMPTS, 512).pairs_batch(images[rows], captions[rows], convs[rows])
    out = step(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in out.items()}, grads


def _rank_main(rank: int, world: int, port: int, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    losses, grads = _loss_and_grads(slice(rank * 4, rank * 4 + 4))
    for g in grads.values():  # as DDP / DeepSpeed: average over ranks
        dist.all_reduce(g)
        g /= world
    values = torch.tensor([losses["loss"], losses["loss_lm"], losses["loss_con"]], dtype=torch.float64)
    dist.all_reduce(values)
    if rank == 0:  # a file, not a queue: a full pipe would block the child while the parent joins
        torch.save(((values / world).tolist(), grads), result_path)
    dist.destroy_process_group()



@pytest.mark.slow
def test_two_processes_of_4_equal_one_process_of_8(tmp_path):
    single, single_grads = _loss_and_grads(slice(None))
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path / "rank0.pt")), nprocs=2, join=True)
    losses, grads = torch.load(tmp_path / "rank0.pt")
    assert losses == pytest.approx([single["loss"], single["loss_lm"], single["loss_con"]], rel=1e-5)
    assert grads.keys() == single_grads.keys() and len(grads) > 20
    for name, g in grads.items():
        ref = single_grads[name]
        # summation order differs: allow 1e-4 of each tensor's largest entry over a float32 noise floor
        scale = float(ref.abs().max()) or 1.0
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4 * scale + 1e-7, msg=lambda m: f"{name}: {m}")


def test_interleaved_mode_uses_mmeb_style_inputs(tiny_attn):
    """train.loss.mode=interleaved: query = image + instruction as plain user text, target = the caption;
    packed rows still equal separate forwards of those inputs."""
    model, processor = tiny_attn
    step = CafeModel(model, JointLoss(a_lm=1.0, a_con=1.0)).eval()
    builder = InputBuilder(processor, PROMPTS, 512)
    images, captions, convs = records(2, seed=7)
    decode = processor.tokenizer.decode
    query, target = builder.pair_prompts(3, captions[0], "interleaved")
    assert decode(query.ids).endswith("<image><image><image>\nRepresent the given image.<|im_end|>\n<|im_start|>assistant\n<|im_end|>")
    assert "Compress" not in decode(query.ids) + decode(target.ids) and captions[0] in decode(target.ids)
    with torch.no_grad():
        packed = builder.pairs_batch(images, captions, convs, mode="interleaved")
        hidden = step.hidden_states(packed)
        separate_q = step(builder.interleaved_batch([(PROMPTS.pair_query, img) for img in images]), mode="embed")
        separate_t = step(builder.interleaved_batch([(c, None) for c in captions]), mode="embed")
        torch.testing.assert_close(step.embeddings(hidden, packed, "a"), separate_q, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step.embeddings(hidden, packed, "b"), separate_t, rtol=1e-4, atol=1e-5)
        assert torch.isfinite(step(packed)["loss_con"])
