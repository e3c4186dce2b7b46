"""The tracker's folder (`tracker.data_path`): what `overwrite_data_path` removes, and when a run may start there.

Rules (docs/TRACKING.md, "`data_path` and auto-resume"):

- with `auto_resume` and an unfinished run recorded there, that run continues and nothing is deleted;
- otherwise, in a folder that is not empty: with `overwrite_data_path` a fresh run starts, after the
  tracker's own entries (`run_state.json`, `metrics.jsonl`, `samples/`, `resume/`, `uploads/`,
  `downloads/`, `wandb/`, `.staging/`) are removed, except an entry holding a file the config reads
  or names (the `tracker.load` file, a saver's destination, the data and embedding folders), and
  never in a filesystem root, the home directory, or the current directory or its parents; without
  it, the run is refused;
- an unreadable `run_state.json` is an error, never taken for "no run";
- an auto-resumed run whose recorded checkpoint has gone is an error, not a silent fresh start.

The pre-flight check (`--check`, and the start of every run) must say no exactly where the tracker
would, so every combination is checked against both.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
import torch

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.preflight import save_problems
from dalle2_decoder.tracking import DataPathError, create_tracker, read_run_state
from dalle2_decoder.tracking.checkpoint import save_checkpoint
from dalle2_decoder.tracking.loaders import LoadError

# Expected config warnings of these tables: `resume` with the console logger, embeddings no U-Net reads.
pytestmark = pytest.mark.filterwarnings(
    "ignore:tracker.log.resume:dalle2_decoder.config.errors.ConfigWarning",
    "ignore:data.text_embeddings_url:dalle2_decoder.config.errors.ConfigWarning",
)

ENTRIES = [
    "run_state.json",
    "metrics.jsonl",
    "samples",
    "resume",
    "uploads",
    "downloads",
    "wandb",
    ".staging",
    "tensorboard",
    "run_config.json",
    "summary.txt",
]
NEW_RUN_RECORDS = ["run_state.json", "run_config.json"]
"""What a new run's tracker writes in `data_path` at its start."""
USERS = ["shards", "latest.pth", "notes.txt"]


def raw_config(data_path: str, **tracker: Any) -> Dict[str, Any]:
    log = {"log_type": "console", **tracker.pop("log", {})}
    return {
        "decoder": {"unets": [{"dim": 8, "image_embed_dim": 4, "dim_mults": [1]}], "image_sizes": [8]},
        "data": tracker.pop("data", {"webdataset_base_url": "/nonexistent/shards/{}.tar"}),
        "train": {"device": "cpu"},
        "tracker": {
            "data_path": data_path,
            "log": log,
            "save": tracker.pop("save", {"save_to": "local", "save_latest_to": "latest.pth"}),
            **tracker,
        },
    }


def fill_previous_run(run: Path, *, finished: bool = True) -> None:
    """A previous run's folder: every tracker entry, and the user's own files beside them."""
    for name in ENTRIES:
        if name == "run_state.json":
            (run / name).write_text(json.dumps({"run_id": "old", "finished": finished, "step": 4}))
        elif name == "metrics.jsonl":
            (run / name).write_text('{"step": 4}\n')
        elif name in ("run_config.json", "summary.txt"):
            (run / name).write_text("the previous run's")
        else:
            (run / name / "inner").mkdir(parents=True)
            (run / name / "inner" / "file.bin").write_bytes(b"x")
    (run / "shards").mkdir()
    (run / "shards" / "000000.tar").write_bytes(b"shard")
    (run / "latest.pth").write_bytes(b"previous")
    (run / "notes.txt").write_text("mine")


def start_tracker(raw: Dict[str, Any]):
    config = TrainDecoderConfig.from_dict(raw)
    return create_tracker(config.tracker, full_config_dict=config.to_dict(), is_main_process=True)


# --- what overwrite_data_path may delete ----------------------------------------------------------

# (name, how the config names a file or folder, the tracker entry that must therefore be kept).
# `{run}` is the data path (absolute), `{elsewhere}` a folder outside it; relative paths are from
# the working directory, except save destinations, which are under the data path.
PLACEMENTS = [
    ("load file, absolute, in resume/", {"load": "{run}/resume/inner/start.pt"}, "resume"),
    ("load file, relative to the working directory", {"load": "run/downloads/inner/start.pt"}, "downloads"),
    ("load file outside", {"load": "{elsewhere}/start.pt"}, None),
    ("save_latest_to, relative, in samples/", {"save": {"save_latest_to": "samples/inner/latest.pth"}}, "samples"),
    ("save_best_to, absolute, in uploads/", {"save": {"save_best_to": "{run}/uploads/inner/best.pth"}}, "uploads"),
    ("save_meta_to, relative, in wandb/", {"save": {"save_meta_to": "wandb/inner"}}, "wandb"),
    ("save_latest_to at the top (a user file)", {"save": {"save_latest_to": "latest.pth"}}, None),
    ("save destination in resume/, relative", {"save": {"save_latest_to": "resume/inner/x.pth"}}, "resume"),
    ("shards, relative pattern, in samples/", {"data": {"webdataset_base_url": "run/samples/inner/{}.tar"}}, "samples"),
    (
        "shards, file:// pattern, in downloads/",
        {"data": {"webdataset_base_url": "file://{run}/downloads/{}.tar"}},
        "downloads",
    ),
    (
        "shards, prefixed pattern, in .staging/",
        {"data": {"webdataset_base_url": "{run}/.staging/inner/part-{}.tar"}},
        ".staging",
    ),
    ("image embeddings folder, absolute, in resume/", {"data": {"img_embeddings_url": "{run}/resume/inner"}}, "resume"),
    (
        "text embeddings folder, file: relative, in uploads/",
        {"data": {"text_embeddings_url": "file:run/uploads/inner"}},
        "uploads",
    ),
    (
        "shards and embeddings outside",
        {"data": {"webdataset_base_url": "{elsewhere}/{}.tar", "img_embeddings_url": "{elsewhere}/emb"}},
        None,
    ),
]


def placed_config(run: Path, elsewhere: Path, placement: Dict[str, Any]) -> Dict[str, Any]:
    def fill(text: str) -> str:
        return text.replace("{run}", str(run)).replace("{elsewhere}", str(elsewhere))

    tracker: Dict[str, Any] = {"overwrite_data_path": True}
    if "load" in placement:
        tracker["load"] = {"load_from": "local", "file_path": fill(placement["load"])}
    if "save" in placement:
        tracker["save"] = {"save_to": "local", **{k: fill(v) for k, v in placement["save"].items()}}
    if "data" in placement:
        tracker["data"] = {
            "webdataset_base_url": "/nonexistent/{}.tar",
            **{k: fill(v) for k, v in placement["data"].items()},
        }
    return raw_config(str(run), **tracker)


@pytest.mark.parametrize("name, placement, kept", PLACEMENTS, ids=[row[0] for row in PLACEMENTS])
def test_overwrite_keeps_exactly_the_entries_holding_what_the_config_names(
    tmp_path, monkeypatch, capsys, name, placement, kept
):
    """`overwrite_data_path` removes every tracker entry of the previous run except one holding a
    file the config reads or names, wherever that file is written down (absolute, relative to the
    working directory, relative to the data path for save destinations, `file:` URLs, shard
    patterns, embedding folders), keeps that entry whole, says which it removes and keeps, and
    never touches the user's files beside them."""
    work = tmp_path / "work"
    run, elsewhere = work / "run", tmp_path / "elsewhere"
    run.mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    fill_previous_run(run)
    raw = placed_config(run, elsewhere, placement)
    load = raw["tracker"].get("load")
    if load:
        target = Path(load["file_path"])
        (target if target.is_absolute() else work / target).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(target, {"w": torch.ones(1)}, step=1)
    tracker = start_tracker(raw)
    said = capsys.readouterr().out
    try:
        left = sorted(path.name for path in run.iterdir())
        expected = sorted(USERS + ([kept] if kept else []) + NEW_RUN_RECORDS)
        assert left == expected, said
        if kept:
            assert (run / kept / "inner" / "file.bin").read_bytes() == b"x", "a kept entry is kept whole"
            assert f"keeping {kept}" in said
        removing = next(line for line in said.splitlines() if "removing the previous run's" in line)
        assert all(entry in removing for entry in ENTRIES if entry != kept)
        assert (run / "shards" / "000000.tar").read_bytes() == b"shard" and (run / "notes.txt").read_text() == "mine"
        assert read_run_state(run).run_id != "old"
    finally:
        tracker.finish()


# --- when a run may start: pre-flight and tracker agree -------------------------------------------

DISK_STATES = [
    "missing",
    "empty",
    "user files only",
    "finished run",
    "unfinished run",
    "unfinished run, checkpoint gone",
    "unreadable run_state.json",
    "run_state.json without a run",
]


def make_disk_state(run: Path, state: str) -> None:
    if state == "missing":
        return
    run.mkdir(parents=True)
    if state == "empty":
        return
    (run / "notes.txt").write_text("mine")
    if state == "user files only":
        return
    if state == "unreadable run_state.json":
        (run / "run_state.json").write_text('{"run_id": ')
        return
    if state == "run_state.json without a run":
        (run / "run_state.json").write_text('{"step": 3}')
        return
    checkpoint: Optional[str] = None
    if state.startswith("unfinished run"):
        checkpoint = str(run / "resume" / "latest_checkpoint.pt")
        if state == "unfinished run":
            save_checkpoint(Path(checkpoint), {"w": torch.ones(1)}, step=3)
    record = {"run_id": "old", "finished": state == "finished run", "step": 3, "latest_checkpoint": checkpoint}
    (run / "run_state.json").write_text(json.dumps(record))


def documented_verdict(state: str, auto_resume: bool, overwrite: bool, at_working_directory: bool) -> bool:
    """True when the run may start (docs/TRACKING.md, written out)."""
    if state in ("missing", "empty"):
        return True
    if state in ("unreadable run_state.json", "run_state.json without a run"):
        return False  # never taken for "no run", whatever the options
    if auto_resume and state.startswith("unfinished run"):
        return state == "unfinished run"  # continued; a recorded checkpoint that has gone is an error
    if overwrite:
        return not at_working_directory
    return False


COMBINATIONS = [
    (state, auto_resume, resume, overwrite, False)
    for state, auto_resume, resume, overwrite in itertools.product(DISK_STATES, *[(False, True)] * 3)
] + [(state, False, False, True, True) for state in ("user files only", "finished run")]


def preflight_says_no(raw: Dict[str, Any]) -> bool:
    """Whether pre-flight lists a problem of the tracker's paths (a listed problem, not an exception)."""
    problems = save_problems(TrainDecoderConfig.from_dict(raw))
    return any(problem.message.startswith("tracker") for problem in problems)


def tracker_says_no(raw: Dict[str, Any]) -> bool:
    try:
        tracker = start_tracker(raw)
    except DataPathError:
        return True
    try:
        tracker.load()
    except LoadError:
        return True
    finally:
        tracker.finish()
    return False


@pytest.mark.parametrize(
    "state, auto_resume, resume, overwrite, at_working_directory",
    COMBINATIONS,
    ids=[f"{s}-auto_resume={a}-resume={r}-overwrite={o}{'-at cwd' if w else ''}" for s, a, r, o, w in COMBINATIONS],
)
def test_preflight_and_tracker_agree_with_the_documented_rule(
    tmp_path, monkeypatch, capsys, state, auto_resume, resume, overwrite, at_working_directory
):
    """For every combination of `auto_resume`, `resume`, `overwrite_data_path` and what the data
    path holds, the run starts exactly when the documented rule says so, and the pre-flight check
    refuses exactly those runs the tracker would refuse at start (so `--check` passing means the
    run gets past its setup). With `overwrite_data_path` in the working directory, nothing is
    removed and both refuse."""
    run = tmp_path / "run"
    make_disk_state(run, state)
    if at_working_directory:
        monkeypatch.chdir(run)
    data_path = "." if at_working_directory else str(run)
    raw = raw_config(data_path, log={"auto_resume": auto_resume, "resume": resume}, overwrite_data_path=overwrite)
    before = sorted(p.relative_to(run) for p in run.rglob("*")) if run.exists() else []
    expected = documented_verdict(state, auto_resume, overwrite, at_working_directory)
    assert preflight_says_no(raw) is not expected, "pre-flight"
    refused = tracker_says_no(raw)
    assert refused is not expected, "tracker"
    if refused or (auto_resume and state.startswith("unfinished run")):
        # nothing of the previous run or the user's is removed when refused or continued
        after = sorted(p.relative_to(run) for p in run.rglob("*")) if run.exists() else []
        assert set(before) <= set(after)
    capsys.readouterr()
