"""The huggingface saver, with the real huggingface_hub client against a loopback hub-compatible server."""

import json
import logging

import pytest
import torch
from huggingface_hub import constants as hub_constants

from dalle2_decoder.config import ConsoleLogConfig, HuggingfaceSaveConfig, LocalSaveConfig, TrackerConfig
from dalle2_decoder.tracking import TrackerSetupError, create_tracker, read_file

from .tracking_servers import HubServer

TOKEN = "hf_test_token_abcdef123456"


@pytest.fixture(autouse=True)
def no_ambient_hub_login(tmp_path, monkeypatch):
    """Tests see only the tokens they set up: no HF_TOKEN and no stored login from the machine."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))


def full_config(hub_save: HuggingfaceSaveConfig):
    # what the trainer passes: the whole run config as JSON data, here with secrets in odd places too
    return {
        "seed": 3,
        "tracker": {
            "save": [
                {
                    "save_to": "huggingface",
                    "huggingface_repo": hub_save.huggingface_repo,
                    "token_path": hub_save.token_path,
                    "hf_token": TOKEN,
                }
            ]
        },
        "data": {"webdataset_base_url": f"https://user:{TOKEN}@example.org/{{}}.tar"},
    }


def make(tmp_path, saves, **options):
    config = TrackerConfig(
        log=ConsoleLogConfig(log_type="console"), save=saves, data_path=str(tmp_path / "run"), **options
    )
    return create_tracker(config, full_config_dict=full_config(saves[0]), is_main_process=True, retry_wait_s=0.0)


def state(value: float):
    # like the trainer's: the run's own config JSON (unmasked) travels inside the checkpoint state
    raw_config = json.dumps({"data": {"webdataset_base_url": f"https://user:{TOKEN}@example.org/{{}}.tar"}})
    return {"model": {"weight": torch.full((4, 4), value)}, "samples_seen": int(value), "config_json": raw_config}


def test_saves_arrive_at_the_requested_paths_and_carry_no_token(tmp_path):
    token_file = tmp_path / "hub_token"
    token_file.write_text(TOKEN + "\n")
    with HubServer(tmp_path / "hub", token=TOKEN) as hub:
        saves = [
            HuggingfaceSaveConfig(
                save_to="huggingface",
                huggingface_repo="team/decoder",
                token_path=str(token_file),
                huggingface_endpoint=hub.url,
                save_latest_to="checkpoints/latest.pt",
                save_best_to="checkpoints/best.pt",
                save_meta_to="meta",
            ),
            HuggingfaceSaveConfig(
                save_to="huggingface",
                huggingface_repo="team/decoder",
                token_path=str(token_file),
                huggingface_endpoint=hub.url,
                save_latest_to="decoder.safetensors",
                save_type="model",
            ),
        ]
        tracker = make(tmp_path, saves)
        tracker.save(step=10, checkpoint_state=state(10.0), model_state={"weight": torch.ones(2)}, is_best=True)
        tracker.save(step=20, checkpoint_state=state(20.0), model_state={"weight": torch.zeros(2)})
        tracker.finish()

        repo = hub.root / "team" / "decoder"
        assert read_file(repo / "checkpoints" / "latest.pt").state["samples_seen"] == 20
        assert read_file(repo / "checkpoints" / "best.pt").state["samples_seen"] == 10
        assert torch.equal(read_file(repo / "decoder.safetensors").model_state["weight"], torch.zeros(2))
        assert json.loads((repo / "meta" / "run_metadata.json").read_text())["step"] == 20
        uploaded_config = (repo / "meta" / "config.json").read_text()
        assert json.loads(uploaded_config)["seed"] == 3
        for text in (
            uploaded_config,
            read_file(repo / "checkpoints" / "latest.pt").config_json,
            read_file(repo / "decoder.safetensors").config_json,
            read_file(repo / "checkpoints" / "latest.pt").state["config_json"],
        ):
            assert TOKEN not in text
        for path in repo.rglob("*"):
            assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
        assert ("POST", "/api/repos/create") in hub.requests
        assert len(hub.commits) == 4  # one commit per saver per save
        assert not tracker.upload_failures
        assert not any((tmp_path / "run" / "uploads").rglob("*.pt"))  # uploaded copies are cleaned up


@pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")  # inside the hub client
def test_token_from_hf_token_and_weights_through_lfs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)  # this server speaks LFS, not Xet
    with HubServer(tmp_path / "hub", token=TOKEN, lfs=True) as hub:
        save = HuggingfaceSaveConfig(
            save_to="huggingface", huggingface_repo="me/dec", huggingface_endpoint=hub.url, save_latest_to="latest.pt"
        )
        tracker = make(tmp_path, [save])
        tracker.save(step=1, checkpoint_state=state(1.0))
        tracker.finish()
        # the weights through LFS; the card and config.json that load_decoder reads (small) as regular files
        assert hub.lfs_uploads and hub.commits[0]["files"] == [
            ("lfsFile", "latest.pt"),
            ("file", "config.json"),
            ("file", "README.md"),
        ]
        assert read_file(hub.root / "me" / "dec" / "latest.pt").state["samples_seen"] == 1


def test_token_from_the_hub_login_and_missing_token_is_an_error_at_start(tmp_path, refused_url):
    save = HuggingfaceSaveConfig(
        save_to="huggingface",
        huggingface_repo="me/dec",
        huggingface_endpoint=refused_url,
        save_latest_to="latest.pt",
    )
    with pytest.raises(
        TrackerSetupError, match="no hub token; log in with `hf auth login`, set HF_TOKEN, or point token_path"
    ):
        make(tmp_path, [save])
    with pytest.raises(TrackerSetupError, match="cannot read token_path"):
        make(
            tmp_path,
            [
                HuggingfaceSaveConfig(
                    save_to="huggingface",
                    huggingface_repo="me/dec",
                    token_path=str(tmp_path / "absent"),
                    save_latest_to="latest.pt",
                )
            ],
        )

    login = tmp_path / "no-login" / "token"  # where `hf auth login` stores the token
    login.parent.mkdir()
    login.write_text(TOKEN)
    with HubServer(tmp_path / "hub", token=TOKEN) as hub:
        save = HuggingfaceSaveConfig(
            save_to="huggingface", huggingface_repo="me/dec", huggingface_endpoint=hub.url, save_latest_to="latest.pt"
        )
        tracker = make(tmp_path, [save])
        tracker.save(step=1, checkpoint_state=state(1.0))
        tracker.finish()
        assert (hub.root / "me" / "dec" / "latest.pt").is_file()


def test_failed_uploads_are_retried_reported_and_training_goes_on(tmp_path, caplog):
    token_file = tmp_path / "hub_token"
    token_file.write_text(TOKEN)
    with HubServer(tmp_path / "hub", token=TOKEN) as hub:
        saves = [
            HuggingfaceSaveConfig(
                save_to="huggingface",
                huggingface_repo="me/dec",
                token_path=str(token_file),
                huggingface_endpoint=hub.url,
                save_latest_to="latest.pt",
            ),
            LocalSaveConfig(save_to="local", save_latest_to="local/latest.pt"),
        ]
        tracker = make(tmp_path, saves, upload_retries=3)
        hub.fail_with = 500
        with caplog.at_level(logging.WARNING, logger="dalle2_decoder.tracking"):
            tracker.save(step=5, checkpoint_state=state(5.0))  # returns: the upload runs in the background
            tracker.wait_for_uploads()
        assert hub.requests.count(("POST", "/api/repos/create")) == 3  # three attempts
        assert len(tracker.upload_failures) == 1
        failure = tracker.upload_failures[0]
        assert "huggingface repo me/dec" in failure and "failed after 3 attempts" in failure and "500" in failure
        assert any(
            record.levelno == logging.ERROR and "failed after 3 attempts" in record.message for record in caplog.records
        )
        kept = list((tmp_path / "run" / "uploads").rglob("latest.pt"))
        assert len(kept) == 1 and str(kept[0]) in failure
        assert read_file(kept[0]).state["samples_seen"] == 5
        assert read_file(tmp_path / "run" / "local" / "latest.pt").state["samples_seen"] == 5

        tracker.save(step=6, checkpoint_state=state(6.0))  # still down: the newer copy replaces the kept one
        tracker.wait_for_uploads()
        (kept,) = list((tmp_path / "run" / "uploads").rglob("latest.pt"))
        assert read_file(kept).state["samples_seen"] == 6 and len(tracker.upload_failures) == 2

        hub.fail_with = None  # the hub is back: the next save goes through
        tracker.save(step=7, checkpoint_state=state(7.0))
        tracker.finish()
        assert read_file(hub.root / "me" / "dec" / "latest.pt").state["samples_seen"] == 7
        assert len(tracker.upload_failures) == 2
        assert not list((tmp_path / "run" / "uploads").rglob("latest.pt"))  # superseded by the upload
