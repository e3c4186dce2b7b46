"""Building the tracker: `create_tracker` and its steps, in the order it takes them.

1. check everything that can be checked before touching anything (`setup_problems`, hub tokens);
2. mask secrets in everything printed, logged or saved from then on (`_mask_secrets`);
3. open the data path: a new run, or the interrupted one continued (`_open_data_path`);
4. start the logger (`_create_logger`), then the loader and the savers.

Only the main process gets a `Tracker`; every other process gets a `NullTracker`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..common.files import atomic_write_text
from ..config.tracker import (
    HuggingfaceSaveConfig,
    LocalLoadConfig,
    LocalSaveConfig,
    LogConfig,
    TensorboardLogConfig,
    TrackerConfig,
    UnetSourcesLoadConfig,
    UrlLoadConfig,
    WandbLoadConfig,
    WandbLogConfig,
    WandbSaveConfig,
    saves_something,
    tracker_problems,
)
from ..failures import EXIT_IO
from .destinations import local_destinations, protected_paths
from .loaders import LoadError, LocalLoader, PartsLoader, UrlLoader, WandbLoader
from .loggers import ConsoleLogger, TensorboardLogger, WandbLogger, generate_run_id
from .redact import OUTPUT, install_output_redaction, redact, secrets_in
from .run_state import RUN_CONFIG_FILE, RunState, clean_staging, prepare_data_path, read_run_state, write_run_state
from .savers import HuggingfaceSaver, LocalSaver, Saver, Uploader, WandbSaver, resolve_hub_token
from .start import Loader

if TYPE_CHECKING:
    from .tracker import NullTracker, Tracker

Logger = Union[ConsoleLogger, TensorboardLogger, WandbLogger]


class TrackerSetupError(ValueError):
    """The tracker configuration cannot work; lists every problem found."""

    exit_status: ClassVar[int] = EXIT_IO

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("tracker configuration problems:\n" + "\n".join(f"  - {problem}" for problem in problems))


def create_tracker(
    config: TrackerConfig,
    *,
    full_config_dict: Mapping[str, Any],
    is_main_process: bool,
    retry_wait_s: float = 2.0,
    sharded_checkpoints: bool = False,
) -> Union[Tracker, NullTracker]:
    """Build the tracker for this process: a `Tracker` on the main process, a `NullTracker` elsewhere.

    `full_config_dict` is the whole run config as plain JSON data; it is logged and saved with
    secrets masked. Every problem with the tracker config (or a missing start checkpoint) is raised
    here, before training starts. `retry_wait_s` is the wait before the first upload retry (doubling after).
    `sharded_checkpoints`: the run saves sharded checkpoints (folders), which only local savers take.
    """
    from .tracker import NullTracker, Tracker

    if not is_main_process:
        return NullTracker()

    data_path = Path(config.data_path).expanduser().resolve()
    previous = read_run_state(data_path) if config.log.auto_resume else None
    problems = setup_problems(config, auto_resuming=previous is not None and not previous.finished)
    if sharded_checkpoints:
        problems += sharded_checkpoint_problems(config)
    hub_tokens = _hub_tokens(config, problems)
    if problems:
        raise TrackerSetupError(problems)

    config_dict, known_secrets = _mask_secrets(full_config_dict, hub_tokens)
    resumed = _open_data_path(config, full_config_dict, data_path)
    run_state = _start_run_state(resumed, data_path)
    logger, restore_argv = _create_logger(config.log, data_path, run_state, resumed, config_dict)
    try:
        write_run_state(data_path, run_state)
        atomic_write_text(data_path / RUN_CONFIG_FILE, json.dumps(config_dict, indent=2, default=str) + "\n")
        loader = _create_loader(config, logger, data_path, resuming_wandb=resumed is not None or config.log.resume)
        savers = _create_savers(config, logger, data_path, hub_tokens)
    except BaseException:
        logger.finish(success=False)
        if restore_argv is not None:
            sys.argv = restore_argv
        raise
    return Tracker(
        config,
        data_path=data_path,
        logger=logger,
        loader=loader,
        savers=savers,
        uploader=Uploader(config.upload_retries, retry_wait_s),
        run_state=run_state,
        auto_resuming=resumed is not None,
        config_dict=config_dict,
        known_secrets=known_secrets,
        restore_argv=restore_argv,
    )


# --- 1. checks -----------------------------------------------------------------------------------


def wandb_offline() -> bool:
    """Whether wandb runs offline here (`WANDB_MODE`)."""
    return os.environ.get("WANDB_MODE", "") in ("offline", "dryrun", "disabled")


def setup_problems(config: TrackerConfig, auto_resuming: bool) -> List[str]:
    """Problems that can be found without touching anything.

    The configuration's own checks (`config.tracker.tracker_problems`, which config loading
    reports too), then what depends on this run and machine: the environment, whether a run is
    being resumed, the start checkpoint's file.
    """
    problems = tracker_problems(config)
    log = config.log
    for index, save in enumerate(config.save):
        if isinstance(save, WandbSaveConfig) and save.wandb_run_path is not None and wandb_offline():
            problems.append(
                f"tracker.save[{index}] ({save.save_to}): saving to another run (wandb_run_path) needs wandb online, "
                "but WANDB_MODE is offline"
            )
    load = config.load
    if load is None or (load.only_auto_resume and not auto_resuming):
        return problems
    if isinstance(load, WandbLoadConfig) and load.wandb_run_path is None and isinstance(log, WandbLogConfig):
        # without wandb logging, tracker_problems has said so already
        if not (log.resume or auto_resuming):
            problems.append(
                "tracker.load (wandb): wandb_run_path is not set and no wandb run is being resumed; set "
                "wandb_run_path to 'entity/project/run_id', or resume a wandb run (tracker.log resume or "
                "auto_resume)"
            )
    elif isinstance(load, (LocalLoadConfig, UrlLoadConfig)):
        try:
            loader = LocalLoader(load) if isinstance(load, LocalLoadConfig) else UrlLoader(load, Path("."))
            loader.check()
        except LoadError as error:
            problems.append(str(error))
    return problems


def sharded_checkpoint_problems(config: TrackerConfig) -> List[str]:
    """Savers that cannot take a sharded run's checkpoints (folders of per-process shards): remote ones."""
    problems = []
    for index, save in enumerate(config.save):
        if isinstance(save, LocalSaveConfig) or save.save_type != "checkpoint" or not saves_something(save):
            continue
        problems.append(
            f"tracker.save[{index}] ({save.save_to}): a sharded (FSDP) run's checkpoints are folders of per-process "
            f"shards, which this saver does not upload; save them with a local saver (on a filesystem every node "
            f"sees) and use save_type model here (one .safetensors file)"
        )
    return problems


def _hub_tokens(config: TrackerConfig, problems: List[str]) -> Dict[int, str]:
    """Each Hugging Face saver's token, by its index in `tracker.save`; a missing one is added to `problems`."""
    tokens: Dict[int, str] = {}
    for index, save in enumerate(config.save):
        if not (isinstance(save, HuggingfaceSaveConfig) and saves_something(save)):
            continue
        try:
            token = resolve_hub_token(save)
        except Exception as error:
            problems.append(str(error))
            continue
        if token is None:
            problems.append(
                f"tracker.save[{index}] (huggingface): no hub token; log in with `hf auth login`, set HF_TOKEN, "
                "or point token_path to a file holding the token"
            )
        else:
            tokens[index] = token
    return tokens


# --- 2. secrets ----------------------------------------------------------------------------------


def _mask_secrets(full_config_dict: Mapping[str, Any], hub_tokens: Dict[int, str]) -> Tuple[Dict[str, Any], List[str]]:
    """Mask the config's secrets and the hub tokens in all output from now on; return the config as
    data with them masked, and the secrets themselves (masked in saved checkpoints too).

    The training loop masks the config's secrets at its start already; the hub tokens are known
    only here, and a tracker built outside the loop needs the config's as well.
    """
    known_secrets = secrets_in(dict(full_config_dict)) + list(hub_tokens.values())
    install_output_redaction(known_secrets)
    return redact(dict(full_config_dict), known_secrets=known_secrets), known_secrets


# --- 3. the data path and the run --------------------------------------------------------------


def _open_data_path(config: TrackerConfig, full_config_dict: Mapping[str, Any], data_path: Path) -> Optional[RunState]:
    """Make `data_path` ready for this run (see `run_state.prepare_data_path`) and remove what a save
    killed midway left there; return the interrupted run's state when this run continues it."""
    resumed = prepare_data_path(
        data_path,
        overwrite=config.overwrite_data_path,
        auto_resume=config.log.auto_resume,
        protected=protected_paths(config, full_config_dict, data_path),
        say=lambda text: print(OUTPUT.text(text), flush=True),
    )
    stray = clean_staging(data_path, local_destinations(config, data_path))
    if stray:
        print(
            f"removed {len(stray)} unfinished save(s) left in {data_path} by a process that was stopped mid-save",
            flush=True,
        )
    return resumed


def _start_run_state(resumed: Optional[RunState], data_path: Path) -> RunState:
    """A new run's state, or the interrupted run's with one more attempt."""
    if resumed is None:
        return RunState(run_id=generate_run_id(), started_at=time.time())
    run_state = dataclasses.replace(resumed, attempts=resumed.attempts + 1)
    print(f"auto-resume: continuing run {run_state.run_id} in {data_path} (attempt {run_state.attempts})", flush=True)
    return run_state


# --- 4. logger, loader, savers -----------------------------------------------------------------


def _create_logger(
    log: LogConfig, data_path: Path, run_state: RunState, resumed: Optional[RunState], config_dict: Dict[str, Any]
) -> Tuple[Logger, Optional[List[str]]]:
    """The logger `tracker.log` names, and the command line to put back when the run ends (wandb only:
    it records the command line, so a secret given there, e.g. `--set ...token=...`, is masked in it)."""
    if isinstance(log, TensorboardLogConfig):
        # resumed: what the interrupted run logged after its checkpoint is discarded by TensorBoard
        logger = TensorboardLogger(data_path, purge_step=resumed.step if resumed is not None else None)
        logger.log_config(config_dict, step=run_state.step)
        return logger, None
    if not isinstance(log, WandbLogConfig):
        return ConsoleLogger(data_path), None
    if resumed is not None:
        run_id, resume = resumed.run_id, "allow"
    elif log.resume:
        run_id, resume = log.wandb_run_id, "must"
    else:
        run_id, resume = log.wandb_run_id or run_state.run_id, None
    restore_argv = sys.argv
    sys.argv = [OUTPUT.text(arg) for arg in sys.argv]
    wandb_logger = WandbLogger(
        entity=log.wandb_entity,
        project=log.wandb_project,
        run_name=log.wandb_run_name,
        run_id=run_id,
        resume=resume,
        config=config_dict,
        wandb_dir=None if os.environ.get("WANDB_DIR") else data_path,
    )
    run_state.run_id = wandb_logger.run_id
    run_state.wandb_run_path = wandb_logger.run_path
    return wandb_logger, restore_argv


def _create_loader(
    config: TrackerConfig, logger: Logger, data_path: Path, resuming_wandb: bool, load=None
) -> Optional[Loader]:
    """The loader of `tracker.load` (or of `load`, one of its U-Net sources)."""
    load = config.load if load is None else load
    downloads = data_path / "downloads"
    if load is None:
        return None
    if isinstance(load, UnetSourcesLoadConfig):
        parts = [
            _create_loader(config, logger, data_path / f"part{index}", resuming_wandb, source.load_model_from)
            for index, source in enumerate(load.unet_sources)
        ]
        return PartsLoader(load, parts)
    if isinstance(load, LocalLoadConfig):
        return LocalLoader(load)
    if isinstance(load, UrlLoadConfig):
        return UrlLoader(load, downloads)
    roots: List[Path] = []
    if isinstance(logger, WandbLogger):
        roots.append(logger.files_dir.parent.parent)
        offline = logger.offline
        run_path = logger.run_path if resuming_wandb else None
    else:
        offline = wandb_offline()
        run_path = None
    if os.environ.get("WANDB_DIR"):
        roots.append(Path(os.environ["WANDB_DIR"]) / "wandb")
    roots.append(data_path / "wandb")
    unique_roots = list(dict.fromkeys(path.resolve() for path in roots))
    return WandbLoader(load, run_path=run_path, wandb_roots=unique_roots, offline=offline, download_dir=downloads)


def _create_savers(config: TrackerConfig, logger: Logger, data_path: Path, hub_tokens: Dict[int, str]) -> List[Saver]:
    """One saver per entry of `tracker.save` that saves something."""
    savers: List[Saver] = []
    for index, save in enumerate(config.save):
        if not saves_something(save):  # beside savers that save (the config check allows no other case)
            continue
        if isinstance(save, LocalSaveConfig):
            savers.append(LocalSaver(save, data_path))
        elif isinstance(save, HuggingfaceSaveConfig):
            savers.append(HuggingfaceSaver(save, hub_tokens[index]))
        else:
            in_run = isinstance(logger, WandbLogger) and save.wandb_run_path is None
            savers.append(
                WandbSaver(
                    save,
                    run_files_dir=(lambda: logger.files_dir) if in_run else None,
                    save_in_run=logger.run.save if in_run else None,
                )
            )
    return savers
