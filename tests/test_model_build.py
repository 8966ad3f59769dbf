"""The project tokenizer, model presets, the processor/model image-token agreement, and checkpoints."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from cafe_core.config import ModelConfig, TinyModelConfig
from cafe_core.data.shapes import detailed_caption, render, sample_scene
from cafe_core.model.build import (
    TINY_MAX_GRID,
    ModelLoadError,
    build,
    fetch_checkpoint,
    image_token_count,
    preset_config,
    processor_for,
    save,
)
from cafe_core.model.tokenizer import SPECIAL_TOKENS, build_tokenizer
from cafe_core.prompts import IMAGE_PROMPT, TEXT_PROMPT
from cafe_core.storage import Storage
from cafe_core.uris import safe_name

VOCAB = TinyModelConfig().vocab_size
EXPECTED_IMAGE_TURN = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nCompress this image in one word:<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# (height, width): square, wide and tall, so different anyres grids and unpadding are exercised.
IMAGE_SIZES = [(64, 64), (48, 80), (100, 30)]


@pytest.fixture(scope="module")
def tiny():
    return build(ModelConfig())


def image_turn(processor, text: str = IMAGE_PROMPT) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def image_batch(processor, sizes=IMAGE_SIZES):
    images = [Image.new("RGB", (w, h), (200, 40 * i, 90)) for i, (h, w) in enumerate(sizes)]
    # Different prompt lengths, so the text is padded as well as the image crops.
    texts = [image_turn(processor, "word " * i + IMAGE_PROMPT) for i in range(len(sizes))]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_is_byte_identical_for_the_same_vocab_size(tmp_path):
    started = time.perf_counter()
    first = build_tokenizer(VOCAB)
    assert time.perf_counter() - started < 3
    build_tokenizer(VOCAB).save_pretrained(tmp_path / "b")
    first.save_pretrained(tmp_path / "a")
    build_tokenizer(VOCAB - 100).save_pretrained(tmp_path / "c")
    a, b, c = ((tmp_path / d / "tokenizer.json").read_bytes() for d in "abc")
    assert a == b
    assert a != c
    assert len(first) == VOCAB


def test_special_tokens_are_single_ids_never_split():
    tok = build_tokenizer(VOCAB)
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tok.unk_token_id not in ids
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        encoded = tok(f"red{token}{token} circle")["input_ids"]
        assert encoded.count(token_id) == 2, token
        assert tok.convert_ids_to_tokens(token_id) == token
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"


def test_any_text_round_trips_and_domain_text_is_compact():
    tok = build_tokenizer(VOCAB)
    for text in ("Ünïcödé ✓ 🙂 \t tabs\nand 12345", "Is there a purple hexagon in the image? Yes"):
        assert tok.decode(tok(text)["input_ids"]) == text
    # Learnt merges: common domain words are one token each.
    assert len(tok(" red circle")["input_ids"]) == 2
    assert len(tok(TEXT_PROMPT)["input_ids"]) <= 8


def test_vocab_size_beyond_the_corpus_is_refused():
    with pytest.raises(ValueError, match="lower model.tiny.vocab_size"):
        build_tokenizer(100_000)


def test_chat_template_is_qwen_1_5():
    tok = build_tokenizer(VOCAB)
    user = [{"role": "user", "content": f"<image>\n{IMAGE_PROMPT}"}]
    assert tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False) == EXPECTED_IMAGE_TURN
    listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT}]}]
    assert tok.apply_chat_template(listed, add_generation_prompt=True, tokenize=False) == EXPECTED_IMAGE_TURN
    dialogue = [
        {"role": "system", "content": "S."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert tok.apply_chat_template(dialogue, tokenize=False) == (
        "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )


# --- tiny model and processor ------------------------------------------------------------------------


def test_tiny_model_shapes(tiny):
    model, processor = tiny
    config = model.config
    tok = processor.tokenizer
    assert isinstance(model, LlavaOnevisionForConditionalGeneration)
    assert config.text_config.vocab_size == len(tok) == VOCAB
    assert config.image_token_id == tok.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert config.video_token_id == tok.convert_tokens_to_ids("<video>")
    assert config.vision_feature_select_strategy == "full" and config.vision_feature_layer == -1
    assert config.image_grid_pinpoints == [[32, 32], [32, 64], [64, 32], [64, 64]]
    assert processor.image_processor.image_grid_pinpoints == config.image_grid_pinpoints
    assert list(processor.image_processor.image_mean) == list(processor.image_processor.image_std) == [0.5] * 3
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert 0.5e6 < model.num_parameters() < 1e6


def test_image_token_counts_match_the_model_across_sizes(tiny):
    model, processor = tiny
    batch = image_batch(processor)
    assert batch["pixel_values"].shape[:2] == (3, 1 + TINY_MAX_GRID**2)  # crops padded to the largest grid
    expected = [image_token_count(processor, h, w) for h, w in IMAGE_SIZES]
    assert expected[0] == 88  # 64x64: 16 base + 2x2 grid of 4x4 patches + 8 row ends
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == expected
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        ).pooler_output
        logits = model(**batch).logits  # raises "Image features and image tokens do not match" otherwise
    assert [f.shape[0] for f in features] == expected
    assert logits.shape == (*batch["input_ids"].shape, VOCAB)
    assert torch.isfinite(logits).all()


def test_training_step_on_shapes_batch(tiny):
    model, processor = tiny
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(8)]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
             {"role": "assistant", "content": detailed_caption(scene, rng)}],
            tokenize=False,
        )
        for scene in scenes
    ]
    batch = processor(images=[render(s, 64) for s in scenes], text=texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.zero_grad()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_same_seed_same_weights_other_seed_different(tiny):
    model, _ = tiny
    same, _ = build(ModelConfig(init_seed=0))
    other, _ = build(ModelConfig(init_seed=1))
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in same.state_dict().items())
    differing = {k for k, v in other.state_dict().items() if not torch.equal(reference[k], v)}
    assert "model.language_model.embed_tokens.weight" in differing
    assert "model.vision_tower.embeddings.patch_embedding.weight" in differing
    assert "model.image_newline" in differing


def test_seeding_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build(ModelConfig(init_seed=7))
    assert torch.equal(torch.rand(3), expected)


def test_dtype_and_attention_are_applied():
    model, _ = build(ModelConfig(dtype="bfloat16", attn_implementation="eager"))
    assert model.dtype == torch.bfloat16
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"


# --- checkpoints -------------------------------------------------------------------------------------


def test_save_then_load_gives_identical_logits(tiny, tmp_path):
    model, processor = tiny
    folder = tmp_path / "cafe-tiny"
    save(model, processor, folder, cafe_config_yaml="model:\n  preset: tiny\n", metrics={"flickr_i2t_r1": 0.25})
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "chat_template.jinja", "cafe_config.yaml", "README.md"):
        assert (folder / name).is_file(), name
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "- cafe\n- llava-onevision\n" in card and "| flickr_i2t_r1 | 0.25 |" in card

    loaded, loaded_processor = build(ModelConfig(preset=None, checkpoint=str(folder)))
    batch = image_batch(processor)
    again = image_batch(loaded_processor)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert loaded_processor.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{IMAGE_PROMPT}"}], add_generation_prompt=True, tokenize=False
    ) == EXPECTED_IMAGE_TURN
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**again).logits)

    bf16, _ = build(ModelConfig(preset=None, checkpoint=str(folder), dtype="bfloat16", attn_implementation="eager"))
    assert bf16.dtype == torch.bfloat16 and bf16.config.text_config._attn_implementation == "eager"


def test_checkpoint_without_chat_template_gets_qwen_1_5(tiny, tmp_path):
    model, processor = tiny
    save(model, processor, tmp_path, cafe_config_yaml="", metrics={})
    (tmp_path / "chat_template.jinja").unlink()
    _, loaded = build(ModelConfig(preset=None, checkpoint=str(tmp_path)))
    assert image_turn(loaded) == EXPECTED_IMAGE_TURN
    assert "No metrics were recorded." in (tmp_path / "README.md").read_text()


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match=r"pickle weights \(pytorch_model.bin\).*safe_serialization=True"):
        build(ModelConfig(preset=None, checkpoint=str(tmp_path)))


@pytest.mark.parametrize(
    "files, message",
    [
        (None, "does not exist"),
        ({}, "has no config.json"),
        ({"config.json": "{}"}, r"has no weights \(\*.safetensors\)"),
    ],
)
def test_incomplete_checkpoint_errors_name_the_folder(tmp_path, files, message):
    folder = tmp_path / "ckpt"
    if files is not None:
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    with pytest.raises(ModelLoadError, match=message) as err:
        build(ModelConfig(preset=None, checkpoint=str(folder)))
    assert str(folder) in str(err.value)


class CountingStorage(Storage):
    def __init__(self):
        super().__init__()
        self.downloads: list[str] = []

    def download(self, uri, local_path):
        self.downloads.append(uri)
        return super().download(uri, local_path)


def test_fetch_checkpoint_mirrors_once_and_follows_changes(tmp_path):
    remote = tmp_path / "remote" / "ckpt"
    (remote / "sub").mkdir(parents=True)
    (remote / "config.json").write_text("{}")
    (remote / "model.safetensors").write_bytes(b"1234")
    (remote / "sub" / "extra.txt").write_text("x")
    cache, store = tmp_path / "cache", CountingStorage()

    folder = fetch_checkpoint(str(remote) + "/", cache, store)
    assert folder == cache / safe_name(str(remote))
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "config.json", "model.safetensors", "sub/extra.txt"]
    assert len(store.downloads) == 3

    fetch_checkpoint(str(remote), cache, store)
    assert len(store.downloads) == 3  # same sizes: nothing fetched again

    (remote / "model.safetensors").write_bytes(b"123456")
    (remote / "sub" / "extra.txt").unlink()
    fetch_checkpoint(str(remote), cache, store)
    assert store.downloads[3:] == [str(remote / "model.safetensors")]
    assert (folder / "model.safetensors").read_bytes() == b"123456"
    assert not (folder / "sub" / "extra.txt").exists()
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no partial downloads left behind


def test_fetch_checkpoint_of_nothing_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="empty or does not exist"):
        fetch_checkpoint(str(tmp_path / "missing"), tmp_path / "cache", Storage())


# --- published presets (config only) -----------------------------------------------------------------


def test_onevision_0_5b_preset_shapes_and_size():
    config = preset_config("llava-onevision-qwen2-0.5b-si")
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1152, 26, 16)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (4304, 384, 14)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (896, 24, 14)
    assert (text.num_key_value_heads, text.intermediate_size) == (2, 4864)
    assert text.vocab_size > max(config.image_token_id, config.video_token_id)
    assert config.image_grid_pinpoints[0] == [384, 384] and config.image_grid_pinpoints[-1] == [2304, 2304]
    assert len(config.image_grid_pinpoints) == 36
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    assert 0.85e9 < model.num_parameters() < 0.95e9
    # A 384x384 image: 27x27 base patches, the same again from the 1x1 grid, plus 27 row ends.
    assert image_token_count(processor_for(config, build_tokenizer(VOCAB)), 384, 384) == 729 * 2 + 27


def test_onevision_7b_preset_shapes():
    config = preset_config("llava-onevision-qwen2-7b-si")
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (3584, 28, 28)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (4, 18944, 152064)
    assert not config.tie_word_embeddings
    assert config.vision_config.hidden_size == 1152 and config.projector_hidden_act == "gelu"


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        preset_config("nope")  # type: ignore[arg-type]


def test_init_std_sets_the_language_model_and_projector_init():
    def stds(tiny):
        params = dict(build(ModelConfig(tiny=tiny))[0].named_parameters())
        return [float(params[n].detach().std()) for n in (
            "model.language_model.layers.0.self_attn.q_proj.weight", "model.multi_modal_projector.linear_1.weight")]

    assert stds(TinyModelConfig()) == pytest.approx([0.02, 0.02], rel=0.1)  # transformers' default
    assert stds(TinyModelConfig(init_std=0.09)) == pytest.approx([0.09, 0.09], rel=0.1)
