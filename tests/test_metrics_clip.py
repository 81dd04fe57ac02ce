import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.clip import CLIPImageProcessorPil

from motion_adapters.metrics.clip_scores import (
    CLIPLoadError,
    as_clip_frames,
    keyframe_indices,
    load_clip,
    resolve_frame_indices,
    temporal_consistency,
    text_alignment,
)
from motion_adapters.video import tensor_to_frames

PROMPT = "a red circle moving right"


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random CLIP (hidden 32, 2 layers, 32x32 images, patch 8) and its processor, saved to ``folder``."""
    byte_chars = list(bytes_to_unicode().values())  # byte-level BPE: every byte has a printable stand-in
    vocab = {char: i for i, char in enumerate(byte_chars)}
    vocab.update({char + "</w>": len(vocab) + i for i, char in enumerate(byte_chars)})
    for token in ("re", "red</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[("r", "e"), ("re", "d</w>")], model_max_length=32)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    return load_clip(tiny_clip_dir)


def _video(num_frames: int = 29, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, num_frames, 40, 48, generator=g) * 2 - 1  # 40x48: the processor resizes and crops


def _embed_by_hand(video, indices, model, processor):
    frames = tensor_to_frames(video)
    pixels = processor(images=[Image.fromarray(frames[i]) for i in indices], return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer([PROMPT], padding=True, return_tensors="pt")
    with torch.no_grad():
        images = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(**tokens)
    images = images if isinstance(images, torch.Tensor) else images.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    return images / images.norm(dim=-1, keepdim=True), text[0] / text[0].norm()


def test_keyframe_indices_every_fourth_for_cascaded_lengths_else_all():
    assert keyframe_indices(29) == (0, 4, 8, 12, 16, 20, 24, 28)
    assert keyframe_indices(5) == (0, 4)
    assert keyframe_indices(8) == tuple(range(8))
    assert keyframe_indices(1) == (0,)
    with pytest.raises(ValueError, match="num_frames must be an int >= 1, got 0"):
        keyframe_indices(0)


def test_resolve_frame_indices_rejects_unknown_names_out_of_range_and_repeats():
    assert resolve_frame_indices(None, 29) == keyframe_indices(29)
    assert resolve_frame_indices("all", 29) == tuple(range(29))
    with pytest.raises(ValueError, match='must be "keyframes", "all" or a list of ints, got \'every\''):
        resolve_frame_indices("every", 8)
    with pytest.raises(ValueError, match=r"frame_indices \[8\] are outside the clip's 8 frames \(0 to 7\)"):
        resolve_frame_indices([0, 8], 8)
    with pytest.raises(ValueError, match="repeat a frame"):
        resolve_frame_indices([1, 1], 8)
    with pytest.raises(ValueError, match="non-empty list of ints"):
        resolve_frame_indices([], 8)


def test_text_alignment_matches_direct_clip_computation_on_keyframes_and_all_frames(tiny_clip):
    model, processor = tiny_clip
    video = _video()
    for frame_indices, indices in ((None, keyframe_indices(29)), ("all", range(29))):
        images, text = _embed_by_hand(video, list(indices), model, processor)
        expected = float((images @ text).mean())
        got = text_alignment(video, PROMPT, model, processor, frame_indices=frame_indices)
        assert got == pytest.approx(expected, abs=1e-5)
    keyframes = text_alignment(video, PROMPT, model, processor)
    assert keyframes != pytest.approx(text_alignment(video, PROMPT, model, processor, frame_indices="all"), abs=1e-6)
    assert text_alignment(video, PROMPT, model, processor, frame_indices=[3]) == pytest.approx(
        float(_embed_by_hand(video, [3], model, processor)[0][0] @ _embed_by_hand(video, [3], model, processor)[1]),
        abs=1e-5,
    )


def test_temporal_consistency_is_the_mean_over_all_frame_pairs(tiny_clip):
    model, processor = tiny_clip
    video = _video()
    for frame_indices, indices in ((None, keyframe_indices(29)), ("all", range(29))):
        images, _ = _embed_by_hand(video, list(indices), model, processor)
        n = len(images)
        expected = np.mean([float(images[i] @ images[j]) for i in range(n) for j in range(i + 1, n)])
        got = temporal_consistency(video, model, processor, frame_indices=frame_indices)
        assert got == pytest.approx(expected, abs=1e-5)


def test_temporal_consistency_of_identical_frames_is_one(tiny_clip):
    still = _video(num_frames=1).expand(3, 8, 40, 48)
    assert temporal_consistency(still, *tiny_clip, frame_indices="all") == pytest.approx(1.0, abs=1e-5)


def test_every_input_form_gives_the_same_scores(tiny_clip, tmp_path):
    model, processor = tiny_clip
    video = _video(num_frames=9)
    frames = tensor_to_frames(video)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):  # natural order: frame_10 would follow frame_9
        Image.fromarray(frame).save(folder / f"frame_{i}.png")
    forms = [video[None], frames, [Image.fromarray(f) for f in frames], list(frames), folder, str(folder)]
    expected = (text_alignment(video, PROMPT, model, processor), temporal_consistency(video, model, processor))
    for form in forms:
        got = (text_alignment(form, PROMPT, model, processor), temporal_consistency(form, model, processor))
        assert got == pytest.approx(expected, abs=1e-6), type(form)


def test_a_batch_scores_the_mean_of_its_clips(tiny_clip):
    model, processor = tiny_clip
    a, b = _video(8, seed=1), _video(8, seed=2)
    batch = torch.stack([a, b])
    mean = (text_alignment(a, PROMPT, model, processor) + text_alignment(b, PROMPT, model, processor)) / 2
    assert text_alignment(batch, PROMPT, model, processor) == pytest.approx(mean, abs=1e-6)
    assert [c.shape for c in as_clip_frames(batch)] == [(8, 40, 48, 3)] * 2


def test_model_may_be_a_folder_or_come_without_its_processor(tiny_clip, tiny_clip_dir):
    model, processor = tiny_clip
    video = _video(8)
    expected = text_alignment(video, PROMPT, model, processor)
    assert text_alignment(video, PROMPT, str(tiny_clip_dir)) == pytest.approx(expected, abs=1e-6)
    assert text_alignment(video, PROMPT, model) == pytest.approx(expected, abs=1e-6)  # processor read beside it


def test_scoring_restores_the_models_mode_and_leaves_weights_alone(tiny_clip):
    model, processor = tiny_clip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        temporal_consistency(_video(8), model, processor, device="cpu")
        assert model.training
    finally:
        model.eval()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_long_prompt_is_truncated_with_a_warning(tiny_clip):
    model, processor = tiny_clip
    with pytest.warns(UserWarning, match="prompt has .* tokens; CLIP reads 32, so it was truncated"):
        score = text_alignment(_video(8), "a red circle " * 10, model, processor)
    assert -1.0 <= score <= 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text_alignment(_video(8), PROMPT, model, processor)


def test_bad_inputs_name_the_problem(tiny_clip):
    model, processor = tiny_clip
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        text_alignment(_video(8), "  ", model, processor)
    with pytest.raises(ValueError, match="a numpy clip must be uint8 of shape"):
        text_alignment(np.zeros((8, 32, 32, 3), np.float32), PROMPT, model, processor)
    with pytest.raises(ValueError, match="needs at least 2 evaluated frames, got 1"):
        temporal_consistency(_video(8), model, processor, frame_indices=[0])
    with pytest.raises(ValueError, match="have different sizes"):
        temporal_consistency([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], model, processor)
    with pytest.raises(ValueError, match="missing.mp4 does not exist"):
        temporal_consistency("missing.mp4", model, processor)
    with pytest.raises(ValueError, match="model must be a transformers CLIPModel"):
        temporal_consistency(_video(8), object(), processor)


def test_load_clip_says_why_it_cannot_load(tmp_path):
    with pytest.raises(CLIPLoadError, match=r"could not load CLIP model 'nobody/no-such-clip'.*not a local folder"):
        load_clip("nobody/no-such-clip", local_files_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CLIPLoadError, match=r"empty'.*The folder needs config.json"):
        load_clip(tmp_path / "empty")
