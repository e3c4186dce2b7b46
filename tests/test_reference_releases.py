"""Files of earlier DALLE2-pytorch releases (fixtures written by each release itself, see
scripts/reference_fixtures/releases.py): each release's trainer checkpoint and model save load and
reproduce that release's samples; the recorded version selects the release's U-Net; a release
that is not supported is refused by name; a cascade assembled from two releases' U-Nets samples
what the two reference parts give chained."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.failures import EXIT_CHECKPOINT
from dalle2_decoder.loading import load, load_model_weights
from dalle2_decoder.models.releases import DIFFERENCES, describe
from dalle2_decoder.tracking import CheckpointError, CheckpointFormatError, read_file

from .decoder_parity import REAL_UNETS_FACTOR
from .numerics import NETWORK, assert_close_to_scale, max_error, scale_of

FIXTURES = Path(__file__).parent / "fixtures" / "reference" / "releases"
RELEASES = sorted(
    (p.name for p in FIXTURES.iterdir() if (p / "meta.json").is_file()), key=lambda r: [int(x) for x in r.split(".")]
)
pytestmark = pytest.mark.usefixtures("compute_threads")

# The samples are images in [0, 1] after 16 (32 for a cascade) denoising steps of real float32
# U-Nets, compared with what the release computed on another machine: the bound of the decoder
# parity tests for outputs of real U-Nets (tests/decoder_parity.py: a network's rounding amplified
# by the first steps of a short schedule), in ulps of the images' scale (at least 1).
ULPS_OF_SCALE = NETWORK * REAL_UNETS_FACTOR


def raw_config(release: str, name: str = "config.json", *, with_release: bool = True) -> dict:
    raw = json.loads((FIXTURES / release / name).read_text())
    if with_release:
        for unet in raw["decoder"]["unets"]:
            unet["reference_release"] = release
    return raw


def samples(release: str, name: str = "samples.safetensors"):
    tensors = load_file(FIXTURES / release / name)
    noise = [tensors[f"noise.{i}"] for i in range(sum(k.startswith("noise.") for k in tensors))]
    return tensors, noise


def assert_close(images: torch.Tensor, expected: torch.Tensor) -> float:
    assert images.shape == expected.shape
    difference = max_error(images, expected)
    assert_close_to_scale(images, expected, ulps_of_scale=ULPS_OF_SCALE, scale=max(1.0, scale_of(expected)))
    return difference


def sample(decoder, tensors, noise, **kwargs):
    decoder.eval()
    with torch.no_grad():
        return decoder.sample(tensors["image_embed"], cond_scale=1.0, noise=noise, **kwargs)


def test_every_release_of_the_table_has_fixtures():
    wanted = ["0.15.4", "0.16", "0.23", "1.0", "1.1", "1.4", "1.8", "1.10", "1.12", "1.14", "1.15.6"]
    for prefix in wanted:
        assert any(r == prefix or r.startswith(prefix + ".") for r in RELEASES), prefix
    record = json.loads((FIXTURES / "releases.json").read_text())
    assert all(record[r]["generated"] for r in RELEASES)


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("name", ["model.pth", "checkpoint.pth"])
def test_a_release_file_reproduces_that_release_s_samples(release, name):
    """load_model_weights into the decoder its config builds, as that release's U-Nets."""
    tensors, noise = samples(release)
    decoder = TrainDecoderConfig.from_dict(raw_config(release)).decoder.create()
    loaded = load_model_weights(decoder, FIXTURES / release / name)
    assert loaded.origin == "dalle2-pytorch"
    if name == "checkpoint.pth" or release >= "1":  # model saves record their release from 1.0 on
        assert loaded.reference_release == release
    assert_close(sample(decoder, tensors, noise), tensors["images"])


@pytest.mark.parametrize("release", [r for r in RELEASES if describe(r)])
def test_a_decoder_built_for_another_release_is_refused_in_one_line(release):
    decoder = TrainDecoderConfig.from_dict(raw_config(release, with_release=False)).decoder.create()
    with pytest.raises(CheckpointError) as error:
        load_model_weights(decoder, FIXTURES / release / "checkpoint.pth")
    message = str(error.value)
    assert f"DALLE2-pytorch {release}" in message and '"reference_release"' in message and "\n" not in message


@pytest.mark.parametrize("release", [r for r in RELEASES if not r.startswith("0.")])
def test_load_decoder_builds_the_recorded_release_s_u_nets(release):
    """Files from 1.0 on record their config and release: load_decoder needs nothing else."""
    tensors, noise = samples(release)
    for name in ("model.pth", "checkpoint.pth"):
        loaded = load(FIXTURES / release / name)
        unets = loaded.decoder.unets
        assert all(describe(u.reference_release) == describe(release) for u in unets)
        assert_close(sample(loaded.decoder, tensors, noise), tensors["images"])


def test_differences_are_selected_by_release():
    names = {d.name for d in DIFFERENCES}
    assert describe("1.15.6") == () and describe("1.14.2") == () and describe("1.10.0") == ()
    assert len(describe("1.8.4")) == 1  # the 4x4 strided downsampling
    assert len(describe("1.4.2")) == 2  # and the self-attention scale
    assert len(describe("0.16.10")) == len(names)  # every one
    assert len(describe("0.16.19")) == len(names) - 1  # the low-res input is clamped from 0.16.16 on
    assert len(describe("0.15.4")) == len(names) - 1  # no division by the maximum in LayerNorm before 0.16.5


def tracker_load(config, raw, data_path):
    """What a run's `tracker.load` gives."""
    import attrs

    from dalle2_decoder.tracking import create_tracker

    tracker = create_tracker(
        attrs.evolve(config.tracker, data_path=str(data_path), save=[]), full_config_dict=raw, is_main_process=True
    )
    try:
        return tracker.load()
    finally:
        tracker.finish()


@pytest.mark.parametrize("release", [r for r in RELEASES if describe(r)])
def test_tracker_load_refuses_a_run_not_configured_for_the_file_s_release(release, tmp_path):
    """Also for model saves, whose U-Nets a run would otherwise take as its own (same names, other function)."""
    raw = raw_config(release, with_release=False)
    name = "model.pth" if release >= "1" else "checkpoint.pth"  # model saves record their release from 1.0 on
    raw["tracker"]["load"] = {"load_from": "local", "file_path": str(FIXTURES / release / name)}
    with pytest.raises(CheckpointError) as error:
        tracker_load(TrainDecoderConfig.from_dict(raw), raw, tmp_path / "run")
    assert f"DALLE2-pytorch {release}" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("release", RELEASES)
def test_a_release_checkpoint_continues_training_here(release, tmp_path):
    from dalle2_decoder.training.trainer import DecoderTrainer

    meta = json.loads((FIXTURES / release / "meta.json").read_text())
    raw = raw_config(release)
    raw["tracker"]["load"] = {"load_from": "local", "file_path": str(FIXTURES / release / "checkpoint.pth")}
    config = TrainDecoderConfig.from_dict(raw)
    trainer = DecoderTrainer(config.decoder.create(), Accelerator(cpu=True), config.train)
    loaded = tracker_load(config, raw, tmp_path / "run")
    assert loaded.reference_release == release
    notes = trainer.load_state_dict(loaded.state["trainer"])
    assert not [n for n in notes if "optimizer" in n], notes
    assert trainer.step == max(meta["steps"])
    size = config.decoder.image_sizes[-1]
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(2, 3, size, size, generator=generator), "image_embed": torch.randn(2, 8)}
    trainer.train_step(batch)
    assert trainer.step == max(meta["steps"]) + 1


def test_a_file_of_an_unsupported_release_is_refused_naming_the_release(tmp_path):
    weights = {"unets.0.w": torch.zeros(2)}
    payload = {"model": weights, "version": "0.15.3", "step": 1.0, "optim0": {"state": {}}}
    torch.save(payload, tmp_path / "old.pth")
    with pytest.raises(CheckpointFormatError) as error:
        read_file(tmp_path / "old.pth")
    message = str(error.value)
    assert "old.pth" in message and "DALLE2-pytorch 0.15.3 is not supported" in message and "\n" not in message


def test_layer_norm_shifts_of_releases_before_0_16_are_dropped_only_when_zero():
    from dalle2_decoder.models import reference_names

    state = {"unets.0.mid_attn.norm.gamma": torch.ones(4), "unets.0.mid_attn.norm.beta": torch.zeros(4)}
    mapped, dropped = reference_names.decoder_state_from_reference_with_dropped(state)
    assert list(mapped) == ["unets.0.mid_attn.norm.g"] and [name for name, _ in dropped] == [
        "unets.0.mid_attn.norm.beta"
    ]
    state["unets.0.mid_attn.norm.beta"] = torch.full((4,), 0.5)  # would shift what the network computes
    with pytest.raises(ValueError, match="unets.0.mid_attn.norm.beta.*not zero"):
        reference_names.decoder_state_from_reference_with_dropped(state)


def test_weights_only_loading_is_not_loosened_for_older_files(tmp_path):
    """A 0.x-style file (its version a string) holding any other object is refused without running it."""
    import argparse

    buffer = io.BytesIO()
    payload = {"model": {"unets.0.w": torch.zeros(2)}, "version": "0.23.10", "steps": torch.tensor([1])}
    torch.save({**payload, "args": argparse.Namespace(a=1), "array": np.zeros(2)}, buffer)
    (tmp_path / "other.pth").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointFormatError) as error:
        read_file(tmp_path / "other.pth")
    assert "weights-only" in str(error.value) and "\n" not in str(error.value)


def test_convert_writes_a_model_save_of_an_earlier_release(tmp_path):
    from dalle2_decoder.convert import main

    release = "1.1.0"
    tensors, noise = samples(release)
    assert main([str(FIXTURES / release / "checkpoint.pth"), str(tmp_path / "d.safetensors")]) == 0
    assert_close(sample(load(tmp_path / "d.safetensors").decoder, tensors, noise), tensors["images"])
    # A 0.x checkpoint records no config: the config is given, and its U-Nets are built for the file's release.
    old = "0.23.10"
    (tmp_path / "cfg.json").write_text(json.dumps(raw_config(old, with_release=False)))
    out = tmp_path / "old.safetensors"
    assert main([str(FIXTURES / old / "checkpoint.pth"), str(out), "--config_file", str(tmp_path / "cfg.json")]) == (
        EXIT_CHECKPOINT
    )
    (tmp_path / "cfg.json").write_text(json.dumps(raw_config(old)))
    assert main([str(FIXTURES / old / "checkpoint.pth"), str(out), "--config_file", str(tmp_path / "cfg.json")]) == 0
    tensors, noise = samples(old)
    assert_close(sample(load(out).decoder, tensors, noise), tensors["images"])


def _cascade_parts():
    """(upsampler release, base release) of the cascade fixture whose upsampler is U-Net 2 of its run's files."""
    for release in RELEASES:
        meta = json.loads((FIXTURES / release / "meta.json").read_text())
        if "cascade" in meta and meta["cascade"]["upsampler"] == "U-Net 2 of model.pth":
            return release, meta["cascade"]["base_release"]
    pytest.fail("no release fixture has cascade samples")


CASCADE_MODEL_RELEASES = [
    r
    for r in RELEASES
    if json.loads((FIXTURES / r / "meta.json").read_text()).get("cascade", {}).get("upsampler")
    == "U-Net 2 of cascade_model.pth"
]


@pytest.mark.parametrize("release", CASCADE_MODEL_RELEASES)
def test_the_upsampler_of_a_one_unet_release_run_continues_another_release_s_samples(release, tmp_path):
    """0.15.4: its upsampler (of a cascade run of its own) resizes the low-res input cubically, unclamped."""
    from dalle2_decoder.convert import main

    base_release = json.loads((FIXTURES / release / "meta.json").read_text())["cascade"]["base_release"]
    (tmp_path / "cascade.json").write_text(json.dumps(raw_config(release, "cascade_config.json", with_release=False)))
    out = tmp_path / "cascade.safetensors"
    base_file, upsampler_file = FIXTURES / base_release / "model.pth", FIXTURES / release / "cascade_model.pth"
    arguments = [
        "--unet",
        f"1={base_file}",
        "--unet",
        f"2={upsampler_file}:2",
        "--config",
        str(tmp_path / "cascade.json"),
    ]
    # The model save of a release before 1.0 records no release: the slot names it.
    assert main([*arguments, "--out", str(out)]) == EXIT_CHECKPOINT
    raw = raw_config(release, "cascade_config.json", with_release=False)
    raw["decoder"]["unets"][1]["reference_release"] = release
    (tmp_path / "cascade.json").write_text(json.dumps(raw))
    assert main([*arguments, "--out", str(out)]) == 0
    base, base_noise = samples(base_release)
    chained, upsampler_noise = samples(release, "cascade_samples.safetensors")
    assert torch.equal(chained["base_images"], base["images"])
    assert_close(sample(load(out).decoder, base, base_noise + upsampler_noise), chained["images"])


def test_a_cascade_of_two_releases_samples_the_reference_parts_chained(tmp_path, capsys):
    from dalle2_decoder.convert import main

    upsampler_release, base_release = _cascade_parts()
    cascade_config = raw_config(upsampler_release, with_release=False)  # the releases come from the parts
    (tmp_path / "cascade.json").write_text(json.dumps(cascade_config))
    out = tmp_path / "cascade.safetensors"
    code = main(
        [
            "--unet",
            f"1={FIXTURES / base_release / 'model.pth'}",
            "--unet",  # the checkpoint records its release (its model save, written before 1.0, does not)
            f"2={FIXTURES / upsampler_release / 'checkpoint.pth'}",
            "--config",
            str(tmp_path / "cascade.json"),
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    decoder = load(out).decoder
    assert [u.reference_release for u in decoder.unets] == [None, upsampler_release]
    base, base_noise = samples(base_release)
    chained, upsampler_noise = samples(upsampler_release, "cascade_samples.safetensors")
    images = sample(decoder, base, base_noise + upsampler_noise)
    assert images.shape[0] == 2
    assert torch.equal(chained["base_images"], base["images"])  # the upsampler continued the base's samples
    assert_close(images, chained["images"])


def test_a_part_that_does_not_fit_its_slot_is_refused_in_one_line(tmp_path, capsys):
    from dalle2_decoder.convert import main

    upsampler_release, base_release = _cascade_parts()
    (tmp_path / "cascade.json").write_text(json.dumps(raw_config(upsampler_release, with_release=False)))

    def refused(second: str) -> str:
        base = FIXTURES / base_release / "model.pth"
        out = tmp_path / "x.safetensors"
        arguments = ["--unet", f"1={base}", "--unet", second, "--config", str(tmp_path / "cascade.json")]
        assert main([*arguments, "--out", str(out)]) == EXIT_CHECKPOINT
        assert not out.exists()
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "U-Net slot 2" in err, err
        return err

    # A base U-Net whose file records its size: trained at 8px, the slot samples at 16px.
    assert "trained at 8px, the slot samples at 16px" in refused(f"2={FIXTURES / base_release / 'model.pth'}:1")
    # One whose file records nothing (a model save before 1.0): its input channels are a base U-Net's.
    assert "input channels" in refused(f"2={FIXTURES / '0.23.10' / 'model.pth'}")
    # An upsampler of a release before 0.24 whose file records no release, in a slot built as 1.15.6's.
    message = refused(f"2={FIXTURES / upsampler_release / 'model.pth'}")
    assert "output convolution" in message and "reference_release" in message


def test_an_assembled_cascade_fine_tunes_its_upsampler_only(tmp_path):
    from dalle2_decoder.convert import main
    from dalle2_decoder.training.trainer import DecoderTrainer

    upsampler_release, base_release = _cascade_parts()
    raw = raw_config(upsampler_release, with_release=False)
    (tmp_path / "cascade.json").write_text(json.dumps(raw))
    out = tmp_path / "cascade.safetensors"
    parts = [f"1={FIXTURES / base_release / 'model.pth'}", f"2={FIXTURES / upsampler_release / 'checkpoint.pth'}"]
    assert (
        main(["--unet", parts[0], "--unet", parts[1], "--config", str(tmp_path / "cascade.json"), "--out", str(out)])
        == 0
    )
    assembled = json.loads(read_file(out).config_json)
    assembled["train"].update(unet_training_mask=[False, True], lr=[0.0, 1e-3])
    config = TrainDecoderConfig.from_dict(assembled)
    decoder = config.decoder.create()
    load_model_weights(decoder, out)
    before = [{k: v.clone() for k, v in u.state_dict().items()} for u in decoder.unets]
    trainer = DecoderTrainer(decoder, Accelerator(cpu=True), config.train)
    generator = torch.Generator().manual_seed(0)
    trainer.train_step({"image": torch.rand(2, 3, 16, 16, generator=generator), "image_embed": torch.randn(2, 8)})
    after = [u.state_dict() for u in trainer.decoder.unets]
    assert all(torch.equal(before[0][k], v) for k, v in after[0].items())
    assert any(not torch.equal(before[1][k], v) for k, v in after[1].items())


def test_tracker_load_assembles_the_same_cascade_from_unet_sources(tmp_path):
    """The `tracker.load` form (dalle2-laion's `unet_sources`): the run's decoder starts from the parts."""
    from dalle2_decoder.config import (
        ConsoleLogConfig,
        LocalLoadConfig,
        TrackerConfig,
        UnetSourceConfig,
        UnetSourcesLoadConfig,
    )
    from dalle2_decoder.tracking import create_tracker

    upsampler_release, base_release = _cascade_parts()

    def sources():
        return UnetSourcesLoadConfig(
            load_from="unet_sources",
            unet_sources=[
                UnetSourceConfig(
                    unet_numbers=[1],
                    load_model_from=LocalLoadConfig(
                        load_from="local", file_path=str(FIXTURES / base_release / "model.pth")
                    ),
                ),
                UnetSourceConfig(
                    unet_numbers=[2],
                    load_model_from=LocalLoadConfig(
                        load_from="local", file_path=str(FIXTURES / upsampler_release / "model.pth")
                    ),
                    file_unet_numbers=[2],
                ),
            ],
        )

    def loaded_with(raw):
        tracker = create_tracker(
            TrackerConfig(
                log=ConsoleLogConfig(log_type="console"),
                save=[],
                data_path=str(tmp_path / f"run{len(list(tmp_path.iterdir()))}"),
                load=sources(),
            ),
            full_config_dict=raw,
            is_main_process=True,
        )
        try:
            return tracker.load()
        finally:
            tracker.finish()

    raw = raw_config(upsampler_release, with_release=False)
    raw["decoder"]["unets"][1]["reference_release"] = upsampler_release  # the run's decoder, as configured
    loaded = loaded_with(raw)
    assert loaded.kind == "model" and "unet_sources" in loaded.source
    decoder = TrainDecoderConfig.from_dict(raw).decoder.create()
    decoder.load_state_dict(loaded.model_state)
    base, base_noise = samples(base_release)
    chained, upsampler_noise = samples(upsampler_release, "cascade_samples.safetensors")
    assert_close(sample(decoder, base, base_noise + upsampler_noise), chained["images"])
    # A slot configured without the part's release is refused in one line naming the slot and the release.
    raw["decoder"]["unets"][1].pop("reference_release")
    with pytest.raises(CheckpointError) as error:
        loaded_with(raw)
    assert "U-Net slot 2" in str(error.value) and upsampler_release in str(error.value)
    assert "\n" not in str(error.value)


def test_unet_sources_configs_are_checked():
    raw = raw_config("1.15.6", with_release=False)
    raw["tracker"]["load"] = {
        "load_from": "unet_sources",
        "unet_sources": [{"unet_numbers": [1, 2], "load_model_from": {"load_from": "local", "file_path": "a.pth"}}],
    }
    from dalle2_decoder.config import ConfigError

    with pytest.raises(ConfigError) as error:
        TrainDecoderConfig.from_dict(raw)
    assert "give every U-Net of the decoder (1 to 1) once" in str(error.value)


@pytest.mark.parametrize("release", RELEASES)
def test_the_evaluation_command_s_loader_takes_each_release(release):
    """`dalle2-evaluate-decoder` builds the decoder from the run's config and loads the checkpoint into it."""
    from dalle2_decoder.evaluate import load_decoder as evaluation_decoder

    tensors, noise = samples(release)
    decoder, step = evaluation_decoder(
        TrainDecoderConfig.from_dict(raw_config(release)), str(FIXTURES / release / "checkpoint.pth"), use_ema=True
    )
    assert step == max(json.loads((FIXTURES / release / "meta.json").read_text())["steps"])
    assert_close(sample(decoder, tensors, noise), tensors["images"])
    if describe(release):  # built for 1.15.6's U-Nets instead: refused, naming the release
        with pytest.raises(CheckpointError, match=f"DALLE2-pytorch {release}"):
            evaluation_decoder(
                TrainDecoderConfig.from_dict(raw_config(release, with_release=False)),
                str(FIXTURES / release / "checkpoint.pth"),
                use_ema=True,
            )


def test_the_sampling_command_takes_a_file_of_an_earlier_release(tmp_path):
    from dalle2_decoder.sample import main

    release = "1.1.0"
    np.save(tmp_path / "embeds.npy", samples(release)[0]["image_embed"].numpy())
    out = tmp_path / "out"
    model = str(FIXTURES / release / "checkpoint.pth")
    assert main(["--model", model, "--embeddings", str(tmp_path / "embeds.npy"), "--out", str(out)]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["count"] == 2 and len(list((out / "images").glob("*.png"))) == 2
