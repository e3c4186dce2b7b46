"""Nothing lost, nothing leaked: overwrite_data_path, damaged run state, kills during saves, secrets."""

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import constants as hub_constants

from dalle2_decoder.config import (
    ConsoleLogConfig,
    HuggingfaceSaveConfig,
    LocalLoadConfig,
    LocalSaveConfig,
    TrackerConfig,
)
from dalle2_decoder.tracking import DataPathError, create_tracker, read_file, read_run_state, save_checkpoint
from dalle2_decoder.tracking.run_state import RunState, write_run_state

from .conftest import REPO_ROOT
from .tracking_servers import HubServer


def console(auto_resume=False):
    return ConsoleLogConfig(log_type="console", auto_resume=auto_resume)


def tracker_config(data_path, **options):
    options.setdefault("log", console())
    return TrackerConfig(data_path=str(data_path), **options)


# --- overwrite_data_path -------------------------------------------------------------------------


def test_overwrite_removes_only_the_trackers_own_files_and_says_which(tmp_path, capsys):
    run = tmp_path / "run"
    first = create_tracker(
        tracker_config(run, save=[LocalSaveConfig(save_to="local", save_latest_to="latest.pth")]),
        full_config_dict={},
        is_main_process=True,
    )
    first.log({"loss": 1.0}, step=1)
    first.log_images("grid", torch.rand(1, 3, 4, 4), None, step=1)
    first.save(step=1, checkpoint_state={"w": torch.ones(2)})
    first.finish()
    # the user keeps things in the same folder: data shards, and a checkpoint to start from
    (run / "shards").mkdir()
    (run / "shards" / "000.tar").write_bytes(b"shard")
    (run / "resume").mkdir(exist_ok=True)
    save_checkpoint(run / "resume" / "start.pt", {"w": torch.full((2,), 7.0)}, step=7)
    (run / "notes.txt").write_text("mine")

    config = tracker_config(
        run,
        overwrite_data_path=True,
        load=LocalLoadConfig(load_from="local", file_path=str(run / "resume" / "start.pt")),
        save=[LocalSaveConfig(save_to="local", save_latest_to="latest.pth")],
    )
    capsys.readouterr()
    tracker = create_tracker(
        config,
        full_config_dict={"data": {"webdataset_base_url": str(run / "shards") + "/{}.tar"}},
        is_main_process=True,
    )
    said = capsys.readouterr().out
    (removing,) = [line for line in said.splitlines() if "removing the previous run's" in line]
    assert all(name in removing for name in ("metrics.jsonl", "run_state.json", "samples"))
    assert "shards" not in removing and "notes.txt" not in removing and "latest.pth" not in removing
    assert "keeping resume" in said
    assert not (run / "metrics.jsonl").exists() and not (run / "samples").exists()
    assert (run / "shards" / "000.tar").read_bytes() == b"shard" and (run / "notes.txt").read_text() == "mine"
    assert (run / "latest.pth").is_file()  # a saver's file: replaced by the next save, never deleted
    loaded = tracker.load()
    assert loaded.step == 7 and torch.equal(loaded.state["w"], torch.full((2,), 7.0))
    assert not read_run_state(run).finished  # a fresh run
    tracker.finish()


@pytest.mark.parametrize("content", ["", '{"run_id": ', "[1, 2]", '{"step": 3}'])
def test_an_unreadable_run_state_is_an_error_and_nothing_is_removed(tmp_path, content):
    run = tmp_path / "run"
    config = tracker_config(
        run,
        log=console(auto_resume=True),
        overwrite_data_path=True,
        save=[LocalSaveConfig(save_to="local", save_latest_to="latest.pth")],
    )
    tracker = create_tracker(config, full_config_dict={}, is_main_process=True)
    tracker.save(step=3, checkpoint_state={"w": torch.ones(2)})  # then the process dies
    (run / "run_state.json").write_text(content)  # e.g. cut by a crash
    with pytest.raises(DataPathError, match="run_state.json .*(cannot be read|is not a run state).*delete it"):
        create_tracker(config, full_config_dict={}, is_main_process=True)
    assert read_file(run / "latest.pth").step == 3
    assert (run / "run_state.json").read_text() == content


def test_run_state_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target):
        events.append(("replace", str(source)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_run_state(tmp_path, RunState(run_id="abc"))
    (replaced,) = [path for kind, path in events if kind == "replace"]
    assert events.index(("fsync", replaced)) < events.index(("replace", replaced))
    assert read_run_state(tmp_path).run_id == "abc"


# --- cut downloads -------------------------------------------------------------------------------


def test_a_download_cut_short_leaves_the_previous_file_whole_and_no_part_behind(tmp_path):
    import http.server
    import threading

    from dalle2_decoder.config import UrlLoadConfig
    from dalle2_decoder.tracking import LoadError
    from dalle2_decoder.tracking.loaders import UrlLoader

    class CutShort(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # promises 1 MiB, sends 1 KiB, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 20))
            self.end_headers()
            self.wfile.write(b"x" * 1024)
            self.wfile.flush()
            self.close_connection = True

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/latest.pth"
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        (downloads / "latest.pth").write_bytes(b"the previous download")
        with pytest.raises(LoadError, match="latest.pth"):
            UrlLoader(UrlLoadConfig(load_from="url", url=url), downloads, timeout_s=10).fetch()
    finally:
        server.shutdown()
        server.server_close()
    assert (downloads / "latest.pth").read_bytes() == b"the previous download"
    assert os.listdir(downloads) == ["latest.pth"]


# --- kills during saves --------------------------------------------------------------------------

SAVE_SCRIPT = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import torch
    from dalle2_decoder.config import ConsoleLogConfig, LocalSaveConfig, TrackerConfig
    from dalle2_decoder.tracking import create_tracker

    data_path, step, kill = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "kill"

    def half_then_killed(source, target, *args, **kwargs):
        # the placement of a saved file is cut by a SIGKILL after half of its bytes
        data = open(source, "rb").read()
        with open(target, "wb") as handle:
            handle.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    if kill:
        os.link = half_then_killed
        shutil.copyfile = half_then_killed
        shutil.copy = half_then_killed
        shutil.copy2 = half_then_killed
    config = TrackerConfig(
        log=ConsoleLogConfig(log_type="console", auto_resume=True), data_path=data_path,
        save=[LocalSaveConfig(save_to="local", save_latest_to="latest.pth", save_best_to="best.pth")],
    )
    tracker = create_tracker(config, full_config_dict={}, is_main_process=True)
    loaded = tracker.load()
    print("LOADED", loaded.step if loaded else None, flush=True)
    tracker.save(step=step, checkpoint_state={"w": torch.full((20000,), float(step))}, is_best=True)
    print("SAVED", step, flush=True)
    """
)


@pytest.mark.slow
def test_latest_and_best_stay_whole_when_a_kill_cuts_their_placement(tmp_path):
    script = tmp_path / "save.py"
    script.write_text(SAVE_SCRIPT)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def start(step, mode):
        return subprocess.run(
            [sys.executable, str(script), str(run), str(step), mode],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    assert start(1, "clean").returncode == 0
    killed = start(2, "kill")
    assert killed.returncode == -signal.SIGKILL and "SAVED" not in killed.stdout
    for name in ("latest.pth", "best.pth"):
        assert torch.equal(read_file(run / name).state["w"], torch.full((20000,), 1.0))  # the old file, whole
    assert list((run / ".staging").iterdir())  # the killed save's leftovers ...

    resumed = start(3, "clean")
    assert resumed.returncode == 0, resumed.stderr
    assert "LOADED 1" in resumed.stdout and "unfinished save(s)" in resumed.stdout
    assert not list((run / ".staging").iterdir())  # ... are removed by the next process
    assert read_file(run / "latest.pth").step == 3 and read_file(run / "best.pth").step == 3
    assert not [path for path in run.rglob("*") if path.name.endswith(".tmp")]


def test_a_run_that_ends_leaves_no_staging_copies(tmp_path):
    run = tmp_path / "run"
    tracker = create_tracker(
        tracker_config(run, save=[LocalSaveConfig(save_to="local", save_latest_to="latest.pth")]),
        full_config_dict={},
        is_main_process=True,
    )
    stray = run / ".staging" / "step_5-deadbeef"  # as a save cut by a kill in another thread would leave it
    stray.mkdir(parents=True)
    (stray / "checkpoint.pt").write_bytes(b"x" * 100)
    tracker.finish()
    assert not stray.exists()


# --- secrets -------------------------------------------------------------------------------------

KEY_SECRET = "key-secret-7f3a9c2e51"  # under a secret-named key of the config
URL_SECRET = "url-pass-4b8d0e6a"  # a URL password in the data section
ENV_SECRET = "env-secret-93cd1f0b7a"  # a secret-looking environment variable
FILE_SECRET = "hf_file_token_51e0c4d8a9"  # the hub token, only in the token_path file
SECRETS = (KEY_SECRET, URL_SECRET, ENV_SECRET, FILE_SECRET)


@pytest.mark.slow
def test_no_secret_from_any_source_in_any_byte_written_printed_or_uploaded(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setenv("MY_SERVICE_TOKEN", ENV_SECRET)
    token_file = tmp_path / "secrets" / "hub_token"
    token_file.parent.mkdir()
    token_file.write_text(FILE_SECRET + "\n")
    url = f"https://reader:{URL_SECRET}@data.example.org/shards/{{00000..00009}}.tar"
    full_config = {"data": {"webdataset_base_url": url}, "extra": {"service_api_key": KEY_SECRET}}
    handler = logging.StreamHandler(sys.stderr)  # like the command's logging.basicConfig
    logging.getLogger().addHandler(handler)
    try:
        with HubServer(tmp_path / "hub", token=FILE_SECRET) as hub:
            saves = [
                LocalSaveConfig(save_to="local", save_latest_to="latest.pth", save_meta_to="meta"),
                LocalSaveConfig(save_to="local", save_latest_to="model.pt", save_type="model"),
                HuggingfaceSaveConfig(
                    save_to="huggingface",
                    huggingface_repo="team/decoder",
                    token_path=str(token_file),
                    huggingface_endpoint=hub.url,
                    save_latest_to="latest.pt",
                    save_meta_to="meta",
                ),
            ]
            tracker = create_tracker(
                tracker_config(tmp_path / "run", save=saves),
                full_config_dict=full_config,
                is_main_process=True,
                retry_wait_s=0.0,
            )
            everything = " ".join(SECRETS)
            tracker.info(f"data {url}; all: {everything}")  # the start-up summary goes this way
            logging.getLogger("dalle2_decoder.data.plan").warning("shard missing: %s (%s)", url, everything)
            print(f"a stray print: {everything}", flush=True)
            print(f"and on stderr: {everything}", file=sys.stderr, flush=True)
            tracker.log({"loss": 0.5}, step=1)
            # the trainer's state carries strings (e.g. a config JSON) that may hold any of them
            state = {"w": torch.ones(2), "note": everything, "nested": [{"url": url}]}
            tracker.save(step=1, checkpoint_state=state, model_state={"w": torch.ones(2)})
            tracker.finish()
            assert hub.commits and not tracker.upload_failures
    finally:
        logging.getLogger().removeHandler(handler)
    out, err = capfd.readouterr()
    assert "***" in out and "***" in err
    files = [path for path in tmp_path.rglob("*") if path.is_file() and path != token_file]
    assert any(path.name == "latest.pt" for path in files) and any(path.name == "config.json" for path in files)
    for secret in SECRETS:
        assert secret not in out and secret not in err, secret
        for path in files:
            assert secret.encode() not in path.read_bytes(), (secret, path)


WANDB_RUN = """
import sys
from dalle2_decoder.config import WandbLogConfig
from dalle2_decoder.tracking import create_tracker
from tests.test_reliability_tracking import KEY_SECRET, tracker_config

url, run_dir = sys.argv[1], sys.argv[2]
argv = ["train_decoder.py", "--config_file", "c.json", "--set", f"data.webdataset_base_url={url}",
        "--set", f"extra.service_api_key={KEY_SECRET}"]
sys.argv = list(argv)
config = tracker_config(run_dir, log=WandbLogConfig(log_type="wandb", wandb_entity="team", wandb_project="decoder"),
                        save=[])
tracker = create_tracker(config, full_config_dict={"data": {"webdataset_base_url": url},
                                                   "extra": {"service_api_key": KEY_SECRET}}, is_main_process=True)
print(f"printed during the run: {url} {KEY_SECRET}", flush=True)
import os
print(f"and the environment's: {os.environ['MY_SERVICE_TOKEN']}", flush=True)
tracker.log({"loss": 1.0}, step=1)
tracker.finish()
assert sys.argv == argv, sys.argv  # given back when the run ends
"""


@pytest.mark.slow
def test_wandb_run_records_neither_the_secret_command_line_nor_printed_secrets(tmp_path):
    # A process of its own, as a training run is: wandb reads the command line once per process, at
    # its first setup, and keeps global state that other tests in this process would share.
    wandb_dir = tmp_path / "wandb-dir"
    wandb_dir.mkdir()
    env = dict(
        os.environ,
        WANDB_MODE="offline",
        WANDB_DIR=str(wandb_dir),
        WANDB_SILENT="true",
        MY_SERVICE_TOKEN=ENV_SECRET,
        PYTHONPATH=str(REPO_ROOT),
    )
    url = f"https://reader:{URL_SECRET}@data.example.org/shards/{{00000..00009}}.tar"
    result = subprocess.run(
        [sys.executable, "-c", WANDB_RUN, url, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "printed during the run" in result.stdout
    files = [path for path in wandb_dir.rglob("*") if path.is_file()]
    # the command line wandb recorded (in the run's metadata record), masked
    assert any(b"data.webdataset_base_url=https://reader:***@" in path.read_bytes() for path in files), [
        p.name for p in files
    ]
    for secret in (URL_SECRET, KEY_SECRET, ENV_SECRET):
        assert secret not in result.stdout and secret not in result.stderr, secret
        for path in files:
            assert secret.encode() not in path.read_bytes(), (secret, path)
