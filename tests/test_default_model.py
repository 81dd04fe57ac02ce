"""The embedded default model: shipped files, configs, shapes, tokenizer coverage, and the pretraining data."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from motion_adapters.world import MOTIONS, SHAPES, render_clip, sample_spec
from motion_adapters.world.default_model import (
    DEFAULT_MODEL_DIR,
    NOISE_SCHEDULER_CONFIG,
    SCHEDULER_CONFIG,
    STAGE_FOLDERS,
    TEXT_ENCODER_CONFIG,
    caption_corpus,
    interpolation_unet_config,
    keyframes_unet_config,
    load_default_components,
    sr_unet_config,
)
from motion_adapters.world.pretrain_data import SpecPool, render_frames
from motion_adapters.world.vocab import BACKGROUNDS, COLORS, UNSEEN_MOTIONS


@pytest.fixture(scope="module")
def components():
    return load_default_components()


def _strip(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def test_shipped_unets_load_with_the_configs_of_default_model(components):
    for key, config in (
        ("unet", keyframes_unet_config()),
        ("interpolation_unet", interpolation_unet_config()),
        ("sr_unet", sr_unet_config()),
    ):
        loaded = json.loads(json.dumps(_strip(components[key].config)))
        config = json.loads(json.dumps(config))
        # the class's own extension keys are filled in at their defaults (Show-1's architecture) on load
        assert loaded.pop("frame_embedding_frames") == config.pop("frame_embedding_frames", 0) == 0, key
        assert loaded.pop("temporal_conv_spatial_kernel") == config.pop("temporal_conv_spatial_kernel", 1) == 1, key
        assert loaded.pop("coordinate_frequencies") == config.pop("coordinate_frequencies", 0) == 0, key
        assert loaded == config, key
        assert components[key].dtype == torch.float32 and not components[key].training


def test_shipped_text_encoder_and_schedulers_match_their_configs(components):
    config = components["text_encoder"].config
    assert config.vocab_size == len(components["tokenizer"])
    for key, value in TEXT_ENCODER_CONFIG.items():
        assert getattr(config, key) == value, key
    assert components["unet"].config.encoder_hid_dim == config.d_model
    scheduler = components["scheduler"]
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert {k: scheduler.config[k] for k in SCHEDULER_CONFIG} == SCHEDULER_CONFIG
    noise_scheduler = components["noise_scheduler"]
    assert type(noise_scheduler).__name__ == "DDPMScheduler"
    assert {k: noise_scheduler.config[k] for k in NOISE_SCHEDULER_CONFIG} == NOISE_SCHEDULER_CONFIG


def test_weights_are_stored_in_float16_and_assets_fit_in_60_mb():
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 60e6
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 4  # T5 + three UNets
    for path in weights:
        with safe_open(path, "pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F16"}, path


def test_forward_pass_of_each_stage_gives_the_stage_shapes(components):
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    tokens = tokenizer(["a red circle moving left on a blue background"], padding="max_length", max_length=77,
                       return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        text = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        assert text.shape == (1, 77, TEXT_ENCODER_CONFIG["d_model"])
        keyframes = components["unet"](torch.randn(1, 3, 8, 32, 32), 500, text).sample
        interpolation = components["interpolation_unet"](torch.randn(1, 7, 5, 32, 32), 500, text).sample
        sr = components["sr_unet"](torch.randn(1, 6, 2, 96, 96), 500, text, class_labels=100).sample
    assert keyframes.shape == (1, 3, 8, 32, 32)
    assert interpolation.shape == (1, 3, 5, 32, 32)
    assert sr.shape == (1, 3, 2, 96, 96)
    assert all(torch.isfinite(x).all() for x in (keyframes, interpolation, sr))


def test_tokenizer_covers_every_caption_word_with_one_piece_and_no_unknown_token(components):
    tokenizer = components["tokenizer"]
    words = sorted({word for caption in caption_corpus() for word in caption.split()})
    assert {"zigzagging", "bouncing", "circle", "checkered"} <= set(words)  # unseen motions are covered too
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, word
    ids = tokenizer("a panda surfing, 42 times!").input_ids
    assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id


def test_shipped_folder_loads_as_a_cascade_with_three_stages():
    from motion_adapters.pipelines import Show1CascadePipeline

    cascade = Show1CascadePipeline.from_pretrained(DEFAULT_MODEL_DIR, torch_dtype=torch.float32)
    assert cascade.stages == ("keyframes", "interpolation", "sr1")
    assert cascade.interpolation.unet.config.in_channels == 7
    assert cascade.sr1.unet.config.class_embed_type == "timestep"


def test_training_log_has_a_loss_curve_for_every_stage():
    log = json.loads((DEFAULT_MODEL_DIR / "training_log.json").read_text())
    for stage in ("keyframes", "interpolation", "sr"):
        curve = log["stages"][stage]["curve"]
        assert len(curve) > 5 and set(curve[0]) == {"step", "loss", "seconds"}
        assert curve[-1]["loss"] < curve[0]["loss"]
    assert all(set(run["pool"]["motions"]).isdisjoint(UNSEEN_MOTIONS) for run in log["runs"])


def test_load_default_components_rejects_a_folder_without_stages(tmp_path):
    with pytest.raises(ValueError, match=r"has no trained \['keyframes', 'interpolation', 'sr1'\] stage"):
        load_default_components(model_dir=tmp_path)
    assert set(STAGE_FOLDERS.values()) == {"keyframes", "interpolation", "sr1"}


@pytest.mark.parametrize("size", [32, 96])
def test_render_frames_reproduces_render_clip_exactly_in_float64(size):
    rng = np.random.default_rng(3)
    specs = [sample_spec(rng, motions=MOTIONS, shapes=(shape,)) for shape in SHAPES for _ in range(2)]
    centers = torch.tensor(np.stack([s.trajectory(8) for s in specs]))
    diameters = torch.tensor(np.stack([s.sizes(8) for s in specs]))
    ids = [
        torch.tensor([names.index(getattr(s, key)) for s in specs])
        for names, key in ((SHAPES, "shape"), (list(COLORS), "color"), (list(BACKGROUNDS), "background"))
    ]
    frames = render_frames(centers, diameters, *ids, size)
    expected = torch.stack([render_clip(s, 8, size, size) for s in specs])
    torch.testing.assert_close(frames.float(), expected, rtol=0, atol=0)


def test_spec_pool_refuses_unseen_motions():
    with pytest.raises(ValueError, match="must be TRAIN_MOTIONS only"):
        SpecPool(4, motions=("left", "zigzag"))
    pool = SpecPool(22, seed=0)
    assert set(pool.motions) <= set(MOTIONS) - set(UNSEEN_MOTIONS)
    assert pool.centers.shape == (22, 29, 2) and pool.unique_captions[-1] == ""


@pytest.mark.slow
def test_pretrain_main_trains_and_saves_every_stage(tmp_path):
    from motion_adapters.world.default_model import load_default_cascade
    from motion_adapters.world.pretrain import main

    log = main(["--out", str(tmp_path), "--minutes", "0.05", "--max-steps", "1", "--num-specs", "32",
                "--workers", "1", "--batch-sizes", "1,1,1"])  # fmt: skip
    assert {stage: log["stages"][stage]["steps"] for stage in log["stages"]} == {
        "keyframes": 1, "interpolation": 1, "sr": 1,
    }  # fmt: skip
    cascade = load_default_cascade(model_dir=tmp_path)
    assert cascade.stages == ("keyframes", "interpolation", "sr1")
    # continuing from saved weights starts near their loss and keeps the earlier record
    log = main(["--out", str(tmp_path), "--stage", "keyframes", "--init-from", str(tmp_path), "--minutes", "0.05",
                "--max-steps", "1", "--num-specs", "32", "--workers", "1", "--batch-sizes", "1,1,1"])  # fmt: skip
    assert log["stages"]["keyframes"]["init_from"] == str(tmp_path)
    assert log["stages"]["keyframes"]["previous"]["steps"] == 1 and len(log["runs"]) == 2


@pytest.mark.slow
def test_default_cascade_generates_29_frames_of_96_pixels():
    from motion_adapters.world.default_model import DEFAULT_CALL_KWARGS, load_default_cascade

    cascade = load_default_cascade()
    frames = cascade("a red circle moving left on a black background", **DEFAULT_CALL_KWARGS, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).frames  # fmt: skip
    assert frames.shape == (1, 3, 29, 96, 96)


def test_tiny_head_attention_processor_matches_the_default_processor():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from motion_adapters.world.default_model import TinyHeadAttnProcessor, build_default_components

    unet = build_default_components(seed=1)["unet"]
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))  # zero-initialised layers too
        sample, text = torch.randn(1, 3, 4, 32, 32), torch.randn(1, 77, TEXT_ENCODER_CONFIG["d_model"])
        temporal = {n: m for n, m in unet.named_modules() if isinstance(m, Attention) and ".temp_attentions." in n}
        for module in temporal.values():
            module.set_processor(AttnProcessor2_0())
        expected = unet(sample, 300, text).sample
        for module in temporal.values():
            module.set_processor(TinyHeadAttnProcessor())
        actual = unet(sample, 300, text).sample
    assert len(temporal) == 14
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_pretrain_options_continue_with_frame_embeddings_wide_temporal_convs_frozen_text_and_a_motion_subset(tmp_path):
    from safetensors.torch import load_file

    from motion_adapters.world.pretrain import main

    log = main(["--out", str(tmp_path), "--stage", "keyframes", "--init-from", "default", "--text-encoder-from",
                "default", "--frame-embedding-frames", "8", "--temporal-conv-spatial-kernel", "3",
                "--coordinate-frequencies", "4", "--weighting", "v-capped", "--motions", "left,right",
                "--minutes", "0.05", "--max-steps", "1", "--num-specs", "16", "--workers", "1",
                "--batch-sizes", "1,1,1"])  # fmt: skip
    stage = log["stages"]["keyframes"]
    assert stage["weighting"] == "v-capped" and not stage["text_encoder_trained"]
    assert log["runs"][-1]["pool"]["motions"] == ["left", "right"]
    folder = tmp_path / STAGE_FOLDERS["keyframes"]
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["frame_embedding_frames"] == 8 and config["temporal_conv_spatial_kernel"] == 3
    assert config["coordinate_frequencies"] == 4
    weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert sum(".frame_embeddings." in key for key in weights) == 7 and "coordinate_embedding.proj.weight" in weights
    wide = [key for key in weights if ".temp_convs." in key and key.endswith("conv1.2.weight")]
    assert wide and all(weights[key].shape[-3:] == (3, 3, 3) for key in wide)
    shipped = load_file(DEFAULT_MODEL_DIR / STAGE_FOLDERS["keyframes"] / "text_encoder" / "model.safetensors")
    saved = load_file(folder / "text_encoder" / "model.safetensors")
    assert saved.keys() == shipped.keys() and all(torch.equal(saved[k], shipped[k]) for k in shipped)


def test_train_stage_rejects_an_unknown_weighting():
    from motion_adapters.world.pretrain import train_stage

    with pytest.raises(ValueError, match="weighting"):
        train_stage("keyframes", torch.nn.Linear(1, 1), None, None, 1.0, 1, 1e-4, weighting="snr")


class _TextProbe(torch.nn.Module):
    """A stand-in keyframe UNet: predicts -x_t, plus a fixed projection of the text when ``reads_text``."""

    def __init__(self, reads_text: bool):
        super().__init__()
        self.anchor, self.reads_text = torch.nn.Parameter(torch.zeros(())), reads_text
        self.dtype = torch.float32

    def forward(self, sample, timestep, text):
        direction = torch.randn(text[0].numel(), generator=torch.Generator().manual_seed(0))
        shift = (text.flatten(1) @ direction / direction.numel() ** 0.5).view(-1, 1, 1, 1, 1) if self.reads_text else 0
        return type("Output", (), {"sample": -sample + shift})


@pytest.mark.parametrize("reads_text", [False, True])
def test_motion_reading_is_one_when_the_text_is_ignored_and_not_when_it_is_read(components, reads_text):
    from motion_adapters.world.pretrain_eval import evaluate_motion_reading

    probe = {**components, "unet": _TextProbe(reads_text)}
    result = evaluate_motion_reading(probe, num_clips=4, timesteps=(500, 900))
    assert [row["t"] for row in result["per_timestep"]] == [500, 900]
    if reads_text:
        assert abs(result["opposite_over_true"] - 1) > 1e-3
    else:
        assert result["opposite_over_true"] == 1.0


def test_pretrain_refuses_a_head_split_for_weights_it_loads(tmp_path):
    from motion_adapters.world.pretrain import main

    with pytest.raises(ValueError, match="--attention-head-dim"):
        main(["--out", str(tmp_path), "--stage", "keyframes", "--init-from", "default", "--attention-head-dim", "8",
              "--max-steps", "1", "--num-specs", "16", "--workers", "1"])  # fmt: skip


class _LayoutOracle(torch.nn.Module):
    """A stand-in keyframe UNet whose clean-clip estimate at the last timestep is a given clip for each caption."""

    def __init__(self, texts: torch.Tensor, clips: torch.Tensor, alpha: float):
        super().__init__()
        self.anchor, self.dtype = torch.nn.Parameter(torch.zeros(())), torch.float32
        self.texts, self.clips, self.alpha = texts, clips, alpha

    def forward(self, sample, timestep, text):
        index = (self.texts.flatten(1) - text[:1].flatten(1)).abs().sum(1).argmin()
        v = (self.alpha**0.5 * sample - self.clips[index]) / (1 - self.alpha) ** 0.5
        return type("Output", (), {"sample": v})


def test_motion_at_pure_noise_is_zero_for_a_direction_blind_unet_and_one_for_the_layout_oracle(components):
    import numpy as np
    from diffusers import DDPMScheduler

    from motion_adapters.world.default_model import NOISE_SCHEDULER_CONFIG
    from motion_adapters.world.pretrain_data import tokenize_captions
    from motion_adapters.world.pretrain_eval import evaluate_motion_at_pure_noise
    from motion_adapters.world.render import render_clip
    from motion_adapters.world.spec import sample_spec

    blind = evaluate_motion_at_pure_noise({**components, "unet": _TextProbe(False)}, pairs=(("right", "left"),),
                                          num_clips=8, num_noises=2)  # fmt: skip
    row = blind["pairs"][0]
    assert blind["timestep"] == 999 and blind["model_over_ideal"] == 0 and row["model_difference"] == 0
    assert row["ideal_difference"] > 0.01  # a right-moving object starts on the left: the mean clips differ
    # the oracle draws each direction's mean layout, estimated from its own renders
    rng, captions, means = np.random.default_rng(123), [], []
    for direction in ("right", "left"):
        specs = [sample_spec(rng, motions=(direction,), shapes=("circle",), colors=("red",), backgrounds=("blue",),
                             speeds=("quickly",)) for _ in range(48)]  # fmt: skip
        captions.append(specs[0].caption)
        means.append(torch.stack([render_clip(s) for s in specs]).mean(0))
    ids, mask = tokenize_captions(components["tokenizer"], captions, torch.device("cpu"))
    with torch.no_grad():
        texts = components["text_encoder"](ids, attention_mask=mask).last_hidden_state
    alpha = DDPMScheduler(**NOISE_SCHEDULER_CONFIG).alphas_cumprod[-1].item()
    oracle = _LayoutOracle(texts, torch.stack(means), alpha)
    with torch.no_grad():
        result = evaluate_motion_at_pure_noise({**components, "unet": oracle}, pairs=(("right", "left"),),
                                               num_clips=48, num_noises=2)  # fmt: skip
    assert 0.8 < result["model_over_ideal"] < 1.2
    assert result["pairs"][0]["model_error"] == pytest.approx(result["pairs"][0]["ideal_error"], rel=0.1)


def test_parse_curriculum_normalises_shares_and_reads_all():
    from motion_adapters.world.pretrain import motions_at, parse_curriculum
    from motion_adapters.world.vocab import TRAIN_MOTIONS

    curriculum = parse_curriculum("right, still:1; right,left:1 ;all:2")
    assert curriculum == [(("right", "still"), 0.25), (("right", "left"), 0.25), (TRAIN_MOTIONS, 0.5)]
    assert [motions_at(curriculum, p) for p in (0.0, 0.24, 0.25, 0.6, 1.0)] == [
        ("right", "still"), ("right", "still"), ("right", "left"), TRAIN_MOTIONS, TRAIN_MOTIONS,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("right,left", "must read 'motion,motion,...:share'"),
        ("right:0", "must be a positive number"),
        ("right:x", "must be a positive number"),
        ("right,zigzag:1", r"names \['zigzag'\]"),
        (" ; ", "has no phase"),
    ],
)
def test_parse_curriculum_rejects_bad_phases_with_the_fix(text, message):
    from motion_adapters.world.pretrain import parse_curriculum

    with pytest.raises(ValueError, match=message):
        parse_curriculum(text)


def test_keyframe_batches_of_a_motion_subset_show_only_those_motions():
    from motion_adapters.world.pretrain_data import ClipBatches

    pool = SpecPool(33, seed=0, motions=("left", "right", "still"))
    batches = ClipBatches(pool, torch.Generator().manual_seed(0))
    right = [i for i, m in enumerate(pool.motions) if m == "right"]
    for _ in range(3):
        batch = batches.keyframes(6, motions=("right",))
        captions = {pool.unique_captions[c] for c in batch["captions"].tolist()}
        assert captions <= {pool.captions[i] for i in right} | {""}
    with pytest.raises(ValueError, match=r"names \['up'\], which the pool has no clips of"):
        batches.keyframes(2, motions=("up",))


def test_pretrain_curriculum_is_logged_and_excludes_motions(tmp_path):
    from motion_adapters.world.pretrain import main

    argv = ["--out", str(tmp_path), "--stage", "keyframes", "--init-from", "default", "--text-encoder-from", "default",
            "--minutes", "0.05", "--max-steps", "1", "--num-specs", "16", "--workers", "1", "--batch-sizes", "1,1,1"]
    log = main([*argv, "--curriculum", "right,still:1;right,left:3"])
    assert log["stages"]["keyframes"]["curriculum"] == [
        {"motions": ["right", "still"], "share": 0.25}, {"motions": ["right", "left"], "share": 0.75},
    ]  # fmt: skip
    assert log["runs"][-1]["pool"]["motions"] == ["left", "right", "still"]
    with pytest.raises(ValueError, match="drop --motions"):
        main([*argv, "--curriculum", "right:1", "--motions", "right"])
