"""The tracker with the console logger, local saves, local and url loading, and its setup checks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalle2_decoder.config import (
    ConsoleLogConfig,
    LocalLoadConfig,
    LocalSaveConfig,
    TrackerConfig,
    UrlLoadConfig,
    WandbLoadConfig,
    WandbLogConfig,
    WandbSaveConfig,
)
from dalle2_decoder.tracking import (
    DataPathError,
    LoadError,
    NullTracker,
    Tracker,
    TrackerSetupError,
    create_tracker,
    read_file,
    read_run_state,
    redact,
    save_checkpoint,
    save_model,
)

from .tracking_servers import FileServer

CONSOLE = ConsoleLogConfig(log_type="console")
CONFIG = {"seed": 1, "tracker": {"data_path": "x"}}


def make(tmp_path, save=(), load=None, log=CONSOLE, main=True, **options):
    config = TrackerConfig(log=log, save=list(save), load=load, data_path=str(tmp_path / "run"), **options)
    return create_tracker(config, full_config_dict=CONFIG, is_main_process=main, retry_wait_s=0.0)


def test_console_logging_writes_lines_jsonl_and_captioned_grids(tmp_path, capsys):
    tracker = make(tmp_path)
    assert isinstance(tracker, Tracker) and (tmp_path / "run").is_dir()
    tracker.log({"loss/unet1": torch.tensor(0.25), "lr": 1e-4, "images": 64}, step=10)
    tracker.log({"loss/unet1": 0.125}, step=20)
    assert "samples seen 10 | loss/unet1 0.25 | lr 0.0001 | images 64" in capsys.readouterr().out

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["samples_seen"] for record in records] == [10, 20]
    assert records[0]["loss/unet1"] == 0.25 and records[1]["loss/unet1"] == 0.125

    images = torch.rand(3, 3, 16, 16)
    tracker.log_images("samples/train", images, ["a cat", "a dog", "a bird"], step=20)
    # images of different sizes (one per U-Net of a cascade) go in one grid too
    tracker.log_images("samples/cascade", [torch.rand(3, 8, 8), torch.rand(3, 16, 16)], ["low", "high"], step=20)
    grid_path = tmp_path / "run" / "samples" / "samples" / "train" / "step_000000020.png"
    grid = Image.open(grid_path)
    # each 16px image enlarged 8 times (128px, nearest neighbour), its caption on a line under it
    assert grid.size[0] == 3 * 128 + 4 * 4 and 128 + 3 * 4 < grid.size[1] < 128 + 3 * 4 + 20
    assert json.loads(grid.text["captions"]) == ["a cat", "a dog", "a bird"]
    sidecar = json.loads(grid_path.with_suffix(".json").read_text())
    assert sidecar["captions"] == ["a cat", "a dog", "a bird"] and sidecar["samples_seen"] == 20
    # the first cell holds the first image, each pixel an 8x8 block
    pixels = torch.tensor(np.array(grid.convert("RGB")), dtype=torch.float32)
    first = pixels[4 : 4 + 128, 4 : 4 + 128]
    expected = images[0].permute(1, 2, 0).repeat_interleave(8, dim=0).repeat_interleave(8, dim=1)
    assert torch.allclose(first / 255, expected, atol=1 / 255)
    # and under it, its caption: dark pixels in the strip below the image, none below the empty cells' row
    caption_strip = pixels[4 + 128 + 4 :, 4 : 4 + 128]
    assert (caption_strip < 128).any()
    assert (tmp_path / "run" / "samples" / "samples" / "cascade" / "step_000000020.png").is_file()
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        tracker.log_images("samples/train", images, ["a", "b"], step=30)
    tracker.finish()
    assert read_run_state(tmp_path / "run").finished


def test_other_ranks_get_a_tracker_that_does_nothing(tmp_path):
    tracker = make(tmp_path, save=[LocalSaveConfig(save_to="local", save_latest_to="latest.pt")], main=False)
    assert isinstance(tracker, NullTracker)
    tracker.log({"loss": 1.0}, step=1)
    tracker.log_images("samples", torch.rand(1, 3, 4, 4), ["x"], step=1)
    tracker.save(step=1, checkpoint_state=lambda: pytest.fail("a non-main rank must not build the state"))
    assert tracker.load() is None
    tracker.finish()
    assert not (tmp_path / "run").exists()


def test_load_broadcast_reaches_every_rank(tmp_path):
    source = tmp_path / "start.pt"
    save_checkpoint(source, {"weights": torch.ones(2)}, step=5)
    sent = []

    def main_broadcast(objects):  # what accelerate's broadcast_object_list does on the sending rank
        sent.append(objects[0])

    main = make(tmp_path, load=LocalLoadConfig(load_from="local", file_path=str(source)))
    loaded = main.load(broadcast=main_broadcast)
    assert loaded.step == 5 and sent == [loaded]

    def other_broadcast(objects):  # ... and on a receiving rank: the list is filled in place
        objects[0] = sent[0]

    assert NullTracker().load(broadcast=other_broadcast) is loaded


def test_non_empty_data_path_is_refused_with_the_ways_forward(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("keep me")
    with pytest.raises(DataPathError) as error:
        make(tmp_path)
    message = str(error.value)
    assert "is not empty" in message and "overwrite_data_path" in message and "another tracker.data_path" in message
    assert (tmp_path / "run" / "old.txt").read_text() == "keep me"

    tracker = make(tmp_path, overwrite_data_path=True)
    assert (tmp_path / "run" / "old.txt").read_text() == "keep me"  # not the tracker's: never removed
    tracker.finish()
    with pytest.raises(DataPathError, match="holds the finished run"):
        make(tmp_path)


def test_an_interrupted_run_is_pointed_to_auto_resume(tmp_path):
    make(tmp_path)  # never finished
    with pytest.raises(DataPathError, match="holds the interrupted run .* set tracker.log.auto_resume to true"):
        make(tmp_path)


def test_local_saves_latest_best_meta_and_model(tmp_path):
    saves = [
        LocalSaveConfig(
            save_to="local",
            save_latest_to="checkpoints/latest.pt",
            save_best_to="checkpoints/best.pt",
            save_meta_to="meta",
        ),
        LocalSaveConfig(
            save_to="local", save_latest_to=str(tmp_path / "export" / "decoder.safetensors"), save_type="model"
        ),
    ]
    tracker = make(tmp_path, save=saves)
    calls = []

    def checkpoint_state():
        calls.append("checkpoint")
        return {"model": {"w": torch.full((2,), 1.0)}, "samples_seen": 100}

    tracker.save(step=100, checkpoint_state=checkpoint_state, model_state={"w": torch.full((2,), 2.0)}, is_best=True)
    tracker.save(
        step=200,
        checkpoint_state={"model": {"w": torch.full((2,), 3.0)}, "samples_seen": 200},
        model_state={"w": torch.full((2,), 4.0)},
    )
    run = tmp_path / "run"
    assert calls == ["checkpoint"]  # built once, however many savers use it
    assert read_file(run / "checkpoints" / "latest.pt").state["samples_seen"] == 200
    assert read_file(run / "checkpoints" / "best.pt").state["samples_seen"] == 100  # only written when best
    model = read_file(tmp_path / "export" / "decoder.safetensors")
    assert model.kind == "model" and torch.equal(model.model_state["w"], torch.full((2,), 4.0))
    assert json.loads(model.config_json) == CONFIG
    assert json.loads((run / "meta" / "config.json").read_text()) == CONFIG
    metadata = json.loads((run / "meta" / "run_metadata.json").read_text())
    assert metadata["step"] == 200 and metadata["run_id"] == tracker.run_id and "torch" in metadata["versions"]
    state = read_run_state(run)
    assert state.latest_checkpoint == str(run / "checkpoints" / "latest.pt") and state.step == 200
    assert not (run / ".staging").exists() or not any((run / ".staging").iterdir())
    tracker.finish()


def test_save_without_the_state_a_saver_needs_is_an_error(tmp_path):
    tracker = make(tmp_path, save=[LocalSaveConfig(save_to="local", save_latest_to="m.pt", save_type="model")])
    with pytest.raises(ValueError, match="needs model_state"):
        tracker.save(step=1, checkpoint_state={"x": 1})


def test_a_saver_that_saves_nothing_is_left_out_beside_one_that_saves(tmp_path):
    """LAION's configs: `{"save_to": "wandb"}` beside a saver with targets (the config check warns)."""
    empty = WandbSaveConfig(save_to="wandb")  # would need a wandb run to save into, were it built
    saving = LocalSaveConfig(save_to="local", save_latest_to="latest.pt")
    tracker = make(tmp_path, save=[empty, saving])
    assert [type(saver).__name__ for saver in tracker.savers] == ["LocalSaver"]
    tracker.finish()
    with pytest.raises(TrackerSetupError, match=r"tracker.save\[0\]: saves nothing"):
        make(tmp_path, save=[empty], overwrite_data_path=True)


def test_local_load_and_only_auto_resume(tmp_path):
    source = tmp_path / "pretrained.safetensors"
    save_model(source, {"w": torch.ones(3)}, step=9)
    tracker = make(tmp_path, load=LocalLoadConfig(load_from="local", file_path=str(source)))
    loaded = tracker.load()
    assert loaded.kind == "model" and loaded.step == 9 and torch.equal(loaded.model_state["w"], torch.ones(3))
    assert not loaded.auto_resumed and str(source) in loaded.source
    tracker.finish()

    fresh = make(
        tmp_path,
        load=LocalLoadConfig(load_from="local", file_path=str(source), only_auto_resume=True),
        overwrite_data_path=True,
    )
    assert fresh.load() is None


def test_problems_are_reported_together_at_start(tmp_path, monkeypatch):
    config = dict(
        save=[
            LocalSaveConfig(save_to="local", save_latest_to="latest.safetensors"),
            WandbSaveConfig(save_to="wandb", save_latest_to="latest.pt"),
        ],
        load=LocalLoadConfig(load_from="local", file_path=str(tmp_path / "missing.pt")),
        upload_retries=0,
    )
    with pytest.raises(TrackerSetupError) as error:
        make(tmp_path, **config)
    problems = error.value.problems
    assert len(problems) == 4
    # the configuration's own checks (the same lines config loading reports) and the start file's
    assert "tracker.upload_retries: must be at least 1 (got 0)" in problems
    assert any(
        p.startswith(
            "tracker.save[0].save_latest_to: latest.safetensors ends in .safetensors but save_type is checkpoint"
        )
        for p in problems
    )
    assert any(
        p.startswith("tracker.save[1].wandb_run_path: needed unless tracker.log.log_type is wandb") for p in problems
    )
    assert any("checkpoint file not found" in p and "missing.pt" in p for p in problems)
    assert not (tmp_path / "run").exists()  # nothing was touched

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(TrackerSetupError, match="wandb_run_path.* needs wandb online"):
        make(tmp_path, save=[WandbSaveConfig(save_to="wandb", save_latest_to="x.pt", wandb_run_path="a/b/c")])
    with pytest.raises(TrackerSetupError, match="must be an http:// or https:// URL"):
        make(tmp_path, load=UrlLoadConfig(load_from="url", url="ftp://example.org/ck.pt"))
    with pytest.raises(TrackerSetupError, match="wandb_run_path: needed unless tracker.log.log_type is wandb"):
        make(tmp_path, load=WandbLoadConfig(load_from="wandb", wandb_file_path="latest.pt"))
    wandb_log = WandbLogConfig(log_type="wandb", wandb_entity="team", wandb_project="decoder")
    with pytest.raises(TrackerSetupError, match="wandb_run_path is not set and no wandb run is being resumed"):
        make(tmp_path, log=wandb_log, load=WandbLoadConfig(load_from="wandb", wandb_file_path="latest.pt"))


def test_url_loading_from_a_local_http_server(tmp_path, capsys):
    served = tmp_path / "served"
    save_checkpoint(served / "ckpts" / "start.pt", {"weights": torch.arange(4.0)}, step=42)
    with FileServer(served) as server:
        tracker = make(tmp_path, load=UrlLoadConfig(load_from="url", url=f"{server.url}/ckpts/start.pt"))
        loaded = tracker.load()
        assert loaded.step == 42 and torch.equal(loaded.state["weights"], torch.arange(4.0))
        assert (tmp_path / "run" / "downloads" / "start.pt").is_file()
        assert "downloaded" in capsys.readouterr().out
        tracker.finish()

        missing = make(
            tmp_path,
            load=UrlLoadConfig(load_from="url", url=f"{server.url}/ckpts/nope.pt?token=s3cr3t"),
            overwrite_data_path=True,
        )
        with pytest.raises(LoadError) as error:
            missing.load()
        assert "HTTP 404" in str(error.value) and "nope.pt" in str(error.value)
        assert "s3cr3t" not in str(error.value)
    port_closed = make(
        tmp_path, load=UrlLoadConfig(load_from="url", url=f"{server.url}/ckpts/start.pt"), overwrite_data_path=True
    )
    with pytest.raises(LoadError, match="could not download the checkpoint from http://127.0.0.1"):
        port_closed.load()


def test_secrets_are_masked_in_configs(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "env-secret-value")
    config = {
        "tracker": {"save": [{"save_to": "huggingface", "token_path": "/home/me/.hf_token", "hf_token": "hf_abc"}]},
        "data": {
            "webdataset_base_url": "https://user:hunter2@example.org/shards/{}.tar?X-Amz-Signature=abcd&part=1",
            "note": "uses env-secret-value and hf_known",
        },
        "train": {"num_tokens": 77, "api_key": None},
    }
    masked = redact(config, known_secrets=["hf_known"])
    text = json.dumps(masked)
    for secret in ("hf_abc", "hunter2", "abcd", "env-secret-value", "hf_known"):
        assert secret not in text
    assert masked["tracker"]["save"][0]["token_path"] == "/home/me/.hf_token"
    assert (
        masked["data"]["webdataset_base_url"] == "https://user:***@example.org/shards/{}.tar?X-Amz-Signature=***&part=1"
    )
    assert masked["train"] == {"num_tokens": 77, "api_key": None}
