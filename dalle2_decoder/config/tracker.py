"""`tracker`: where metrics and images are logged, where a checkpoint is loaded from, where saves go.

Each family is a union of classes told apart by a literal discriminator field (`log_type`,
`load_from`, `save_to`), so the JSON names the implementation and the class carries exactly the
keys that implementation needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, List, Literal, NamedTuple, Optional, Sequence, Union

import attrs

from .checks import at_least, not_empty

if TYPE_CHECKING:
    from .root import TrainDecoderConfig

# --- log -------------------------------------------------------------------------------------


@attrs.frozen
class ConsoleLogConfig:
    """Log metric lines to the console, metrics to a JSON-lines file and sample grids as PNG under `data_path`."""

    log_type: Literal["console"]
    """Must be `console`."""
    resume: bool = False
    """Accepted for all loggers; the console logger has no remote run to resume."""
    auto_resume: bool = False
    """Continue from the latest checkpoint found under `data_path` when the run was interrupted."""
    verbose: bool = False
    """Also print debug-level messages."""


@attrs.frozen
class WandbLogConfig:
    """Log to Weights & Biases."""

    log_type: Literal["wandb"]
    """Must be `wandb`."""
    wandb_entity: str
    """The wandb entity (user or team) to log to."""
    wandb_project: str
    """The wandb project to log to."""
    wandb_run_name: Optional[str] = None
    """Display name of the run."""
    wandb_run_id: Optional[str] = None
    """Run id; with `resume`, the run to continue."""
    resume: bool = False
    """Resume the run given by `wandb_run_id`."""
    auto_resume: bool = False
    """Continue the run that was interrupted, found from the metadata under `data_path`."""
    verbose: bool = False
    """Also print debug-level messages."""


@attrs.frozen
class TensorboardLogConfig:
    """Log to TensorBoard event files under `data_path/tensorboard/`, besides everything the console logger writes.

    Scalars (x-axis: training samples seen), sample grids with their captions, the resolved config
    as text. An auto-resumed run appends to the same folder, discarding what the interrupted run
    logged after the checkpoint it resumes from. View with `tensorboard --logdir DATA_PATH/tensorboard`.
    """

    log_type: Literal["tensorboard"]
    """Must be `tensorboard`."""
    resume: bool = False
    """Accepted for all loggers; TensorBoard has no remote run to resume."""
    auto_resume: bool = False
    """Continue from the latest checkpoint found under `data_path` when the run was interrupted."""
    verbose: bool = False
    """Also print debug-level messages."""


LogConfig = Union[ConsoleLogConfig, WandbLogConfig, TensorboardLogConfig]

# --- load ------------------------------------------------------------------------------------


@attrs.frozen
class LocalLoadConfig:
    """Load a checkpoint from a local file."""

    load_from: Literal["local"]
    """Must be `local`."""
    file_path: str
    """Path of the checkpoint file."""
    only_auto_resume: bool = False
    """Load only when the run is being auto-resumed."""


@attrs.frozen
class UrlLoadConfig:
    """Download a checkpoint over http(s)."""

    load_from: Literal["url"]
    """Must be `url`."""
    url: str
    """URL of the checkpoint file."""
    only_auto_resume: bool = False
    """Load only when the run is being auto-resumed."""


@attrs.frozen
class WandbLoadConfig:
    """Load a checkpoint file stored in a wandb run."""

    load_from: Literal["wandb"]
    """Must be `wandb`."""
    wandb_file_path: str
    """Path of the checkpoint inside the run's files."""
    wandb_run_path: Optional[str] = None
    """`entity/project/run_id` of the run holding the file; None uses the run being resumed."""
    only_auto_resume: bool = False
    """Load only when the run is being auto-resumed."""


FileLoadConfig = Union[LocalLoadConfig, UrlLoadConfig, WandbLoadConfig]


@attrs.frozen
class UnetSourceConfig:
    """One file of a decoder assembled from parts: which U-Nets of the decoder it gives."""

    unet_numbers: List[int]
    """The decoder's U-Nets this file fills, numbered from 1."""
    load_model_from: FileLoadConfig
    """Where the file is, as a `tracker.load` of its own (`local`, `url` or `wandb`): a model save or
    checkpoint of this package, or of DALLE2-pytorch (any supported release)."""
    file_unet_numbers: Optional[List[int]] = None
    """The file's U-Nets that fill them, in the same order; None takes the same numbers, or the file's
    only U-Net."""


@attrs.frozen
class UnetSourcesLoadConfig:
    """Start from a decoder assembled from U-Nets of different files (as dalle2-laion's `unet_sources`).

    Each part is checked against its U-Net of `decoder` (channels, sizes, conditioning) and the run
    starts fresh with the assembled weights, as from a model save; `dalle2-convert-checkpoint --unet`
    writes the same decoder to one file.
    """

    load_from: Literal["unet_sources"]
    """Must be `unet_sources`."""
    unet_sources: List[UnetSourceConfig]
    """The files and the U-Nets each gives; together they give every U-Net of the decoder once."""
    use_ema: bool = True
    """From checkpoints, take the EMA weights (false: the trained weights)."""
    only_auto_resume: bool = False
    """Load only when the run is being auto-resumed."""


LoadConfig = Union[LocalLoadConfig, UrlLoadConfig, WandbLoadConfig, UnetSourcesLoadConfig]


def unet_sources_problems(load: "UnetSourcesLoadConfig") -> List[str]:
    """Each source names U-Nets from 1, as many file U-Nets as U-Nets, and no U-Net twice."""
    problems: List[str] = []
    seen: List[int] = []
    if not load.unet_sources:
        problems.append("tracker.load.unet_sources: give at least one source")
    for index, source in enumerate(load.unet_sources):
        where = f"tracker.load.unet_sources[{index}]"
        if not source.unet_numbers or any(n < 1 for n in source.unet_numbers):
            problems.append(f"{where}.unet_numbers: give the decoder's U-Nets it fills, numbered from 1")
        if source.file_unet_numbers is not None and len(source.file_unet_numbers) != len(source.unet_numbers):
            problems.append(
                f"{where}.file_unet_numbers: has {len(source.file_unet_numbers)} entries for "
                f"{len(source.unet_numbers)} unet_numbers; give one per U-Net"
            )
        twice = sorted(set(source.unet_numbers) & set(seen))
        if twice:
            problems.append(f"{where}.unet_numbers: U-Net(s) {twice} are given by an earlier source already")
        seen += source.unet_numbers
    return problems


SAVE_PATH_FIELDS = ("epoch", "sample", "next_task", "validation_losses", "samples_seen")
"""Fields `save_latest_to` / `save_best_to` may name, filled in at each save as DALLE2-pytorch does:
`{epoch}` (the epoch the save belongs to, from 0), `{sample}` (samples of that epoch so far),
`{next_task}` (`train` inside an epoch, `sample` at its end), `{validation_losses}` (the list so
far) and `{samples_seen}` (training samples so far)."""


def save_path_field_problems(where: str, template: Optional[str]) -> List[str]:
    """`{field}`s of a save path that do not exist, or braces that do not form a field."""
    import string

    if not template:
        return []
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        return [f"{where}: {template!r} is not a valid path template ({error}); write {{{{ and }}}} for literal braces"]
    unknown = [name for name in names if name.split(".")[0].split("[")[0] not in SAVE_PATH_FIELDS]
    if unknown:
        return [
            f"{where}: unknown field {{{unknown[0]}}} in {template!r}; fields are "
            + ", ".join(f"{{{name}}}" for name in SAVE_PATH_FIELDS)
        ]
    return []


# --- save ------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SaveTargets:
    """What every saver writes and where; each saver adds where it writes to.

    Paths are local paths for `local` (relative ones under `data_path`), paths in the repository
    for `huggingface` and paths in the run's files for `wandb`. Shared by the three saver classes
    (keyword-only, so each saver's own required options can follow these defaulted ones).
    """

    save_latest_to: Optional[str] = None
    """Path of the latest save, overwritten each time."""
    save_best_to: Optional[str] = None
    """Path of the save with the lowest validation loss so far."""
    save_meta_to: Optional[str] = None
    """Folder for the config used and run metadata."""
    save_type: Literal["checkpoint", "model"] = "checkpoint"
    """`checkpoint`: everything needed to resume; `model`: weights only (EMA when enabled)."""
    keep_last: Optional[int] = None
    """With a `save_latest_to` that names a field (`latest_{epoch}.pth`): keep only the last this many
    files that this saver wrote there, deleting older ones once a newer one is whole on disk. Never
    deletes another file (the `tracker.load` file, a best save, the run's resume point, files of an
    earlier run). Local savers only. None keeps every file."""


@attrs.frozen
class LocalSaveConfig(SaveTargets):
    """Save checkpoints, models and metadata to local paths (relative paths are under `data_path`)."""

    save_to: Literal["local"]
    """Must be `local`."""


@attrs.frozen
class HuggingfaceSaveConfig(SaveTargets):
    """Upload saves to a Hugging Face Hub model repository."""

    save_to: Literal["huggingface"]
    """Must be `huggingface`."""
    huggingface_repo: str
    """Repository id, e.g. `user/my-decoder`; created when missing."""
    token_path: Optional[str] = None
    """File holding the hub token, when the hub client's login or `HF_TOKEN` is not available."""
    huggingface_endpoint: Optional[str] = None
    """Hub endpoint URL for self-hosted hubs; None uses the client's default (or `HF_ENDPOINT`)."""


@attrs.frozen
class WandbSaveConfig(SaveTargets):
    """Upload saves as files of a wandb run."""

    save_to: Literal["wandb"]
    """Must be `wandb`."""
    wandb_run_path: Optional[str] = None
    """Run to save into; None uses the current run (almost always what you want)."""


SaveConfig = Union[LocalSaveConfig, HuggingfaceSaveConfig, WandbSaveConfig]

# --- tracker ---------------------------------------------------------------------------------


@attrs.frozen
class TrackerConfig:
    """Where the run is logged, loaded from and saved to."""

    log: LogConfig
    """Logger configuration (`console`, `wandb` or `tensorboard`)."""
    save: List[SaveConfig]
    """One saver or a list of savers (`local`, `huggingface`, `wandb`)."""
    load: Optional[LoadConfig] = None
    """Checkpoint to start from (`local`, `url` or `wandb`); None (or `load_from: null`) starts fresh."""
    data_path: str = "./.tracker-data"
    """Folder for run data: logs, sample grids, local saves, auto-resume state."""
    overwrite_data_path: bool = False
    """Start a fresh run in an existing non-empty `data_path` instead of failing: the previous run's
    tracker files are removed (never a file the config reads or names; see docs/TRACKING.md)."""
    upload_retries: int = 3
    """Attempts for each upload before the failure is reported (training goes on)."""
    progress_interval_s: float = 30.0
    """Seconds between plain progress lines when the output is not a terminal (a file, a pipe, a SLURM
    log); there is a line at the start and end of each phase too. A terminal gets progress bars."""

    def check(self, root: "TrainDecoderConfig") -> List[str]:
        """`tracker_problems`, and a training run saves somewhere (a tracker built in code may only log)."""
        problems = tracker_problems(self) + (["tracker.save: needs at least one saver"] if not self.save else [])
        if isinstance(self.load, UnetSourcesLoadConfig):
            count = len(root.decoder.unets)
            given = sorted(n for source in self.load.unet_sources for n in source.unet_numbers)
            if given != list(range(1, count + 1)):
                problems.append(
                    f"tracker.load.unet_sources: give every U-Net of the decoder (1 to {count}) once; they give {given}"
                )
        return problems

    def notes(self, root: "TrainDecoderConfig") -> List[str]:
        notes = []
        if any(saves_something(saver) for saver in self.save):
            notes += [
                f"tracker.save[{index}]: saves nothing (no save_latest_to, save_best_to or save_meta_to), left out "
                "of the run; DALLE2-pytorch before 0.26.2 saved latest.pth and best.pth there by default: set "
                "save_latest_to and save_best_to to save there"
                for index, saver in enumerate(self.save)
                if not saves_something(saver)
            ]
        if isinstance(self.log, (ConsoleLogConfig, TensorboardLogConfig)) and self.log.resume:
            notes.append(
                f"tracker.log.resume: the {self.log.log_type} logger has no remote run to resume, so this is ignored "
                "(auto_resume continues an interrupted run from tracker.data_path)"
            )
        return notes


def tracker_problems(tracker: TrackerConfig) -> List[str]:
    """Each logger, loader and saver has what its kind needs, and each saver saves something.

    The one home of the tracker's checks that need nothing but the configuration: config loading
    reports them, and `create_tracker` applies them to a config built in code as well.
    """
    problems = not_empty("tracker.data_path", tracker.data_path) + at_least(
        "tracker.upload_retries", tracker.upload_retries, 1
    )
    if not tracker.progress_interval_s > 0:
        problems.append(f"tracker.progress_interval_s: must be above 0 seconds (got {tracker.progress_interval_s})")
    log, load = tracker.log, tracker.load
    logs_to_wandb = isinstance(log, WandbLogConfig)
    if logs_to_wandb:
        problems += not_empty("tracker.log.wandb_entity", log.wandb_entity)
        problems += not_empty("tracker.log.wandb_project", log.wandb_project)
        if log.resume and not log.wandb_run_id:
            problems.append("tracker.log.resume: needs tracker.log.wandb_run_id, the run to resume")
    if isinstance(load, UnetSourcesLoadConfig):
        problems += unet_sources_problems(load)
    if isinstance(load, LocalLoadConfig):
        problems += not_empty("tracker.load.file_path", load.file_path)
    elif isinstance(load, UrlLoadConfig):
        problems += not_empty("tracker.load.url", load.url)
    elif isinstance(load, WandbLoadConfig):
        problems += not_empty("tracker.load.wandb_file_path", load.wandb_file_path)
        if load.wandb_run_path is None and not logs_to_wandb:
            problems.append(
                "tracker.load.wandb_run_path: needed unless tracker.log.log_type is wandb (without it "
                "the checkpoint is taken from the logged run)"
            )
    any_saves = any(saves_something(saver) for saver in tracker.save)
    for index, saver in enumerate(tracker.save):
        path = f"tracker.save[{index}]"
        if not saves_something(saver):
            if not any_saves:
                problems.append(f"{path}: saves nothing; set save_latest_to, save_best_to or save_meta_to")
            continue  # left out of the run beside savers that save (TrackerConfig.notes says so)
        problems += _saver_problems(path, saver, logs_to_wandb)
    return problems


SAVE_TARGETS = ("save_latest_to", "save_best_to", "save_meta_to")


def saves_something(saver: SaveTargets) -> bool:
    """Whether a saver has a target (a saver without one is left out of a run that has others)."""
    return any(getattr(saver, name) is not None for name in SAVE_TARGETS)


class SaveDestination(NamedTuple):
    """One path a local saver writes to, and the option that names it."""

    index: int
    """The saver's position in `tracker.save`."""
    field: str
    """`save_latest_to`, `save_best_to` or `save_meta_to`."""
    path: Path
    """Where it is on this machine (`{epoch}`-style fields left as written)."""


def resolve_save_path(dest: str, data_path: Union[str, Path]) -> Path:
    """A local saver's destination on this machine: `~` expanded, a relative path under `data_path`."""
    return Path(os.path.join(data_path, os.path.expanduser(dest)))


def local_save_destinations(
    tracker: TrackerConfig, data_path: Union[str, Path], fields: Sequence[str] = SAVE_TARGETS
) -> List[SaveDestination]:
    """Every path the local savers of `tracker.save` name in `fields`, saver by saver.

    The one place that decides where local saves land: the tracker (what `overwrite_data_path`
    keeps, which staging leftovers are a killed save's), preflight (folders writable, with space)
    and the command's report of a failed write all read it.
    """
    saves = tracker.save if isinstance(tracker.save, (list, tuple)) else [tracker.save]
    return [
        SaveDestination(index, field, resolve_save_path(dest, data_path))
        for index, save in enumerate(saves)
        if isinstance(save, LocalSaveConfig)
        for field in fields
        for dest in [getattr(save, field)]
        if dest
    ]


def _saver_problems(path: str, saver: SaveTargets, logs_to_wandb: bool) -> List[str]:
    problems = []
    targets = SAVE_TARGETS
    for name in targets:
        problems += not_empty(f"{path}.{name}", getattr(saver, name))
    for name in ("save_latest_to", "save_best_to"):
        template = getattr(saver, name)
        problems += save_path_field_problems(f"{path}.{name}", template)
        if template and template.endswith(".safetensors") and saver.save_type == "checkpoint":
            problems.append(
                f"{path}.{name}: {template} ends in .safetensors but save_type is checkpoint; safetensors "
                "holds model weights only (save_type: model), checkpoints are .pt files"
            )
    problems += keep_last_problems(path, saver)
    if isinstance(saver, HuggingfaceSaveConfig):
        problems += not_empty(f"{path}.huggingface_repo", saver.huggingface_repo)
    if isinstance(saver, WandbSaveConfig) and saver.wandb_run_path is None and not logs_to_wandb:
        problems.append(
            f"{path}.wandb_run_path: needed unless tracker.log.log_type is wandb (without it "
            "saves go into the logged run)"
        )
    return problems


def template_fields(template: Optional[str]) -> List[str]:
    """The `{field}` names of a save path (empty for a fixed path, or one that does not parse)."""
    import string

    try:
        return [name for _, name, _, _ in string.Formatter().parse(template or "") if name]
    except ValueError:
        return []


def keep_last_problems(path: str, saver: SaveTargets) -> List[str]:
    """`keep_last` is at least 1, on a local saver whose `save_latest_to` names a field."""
    if saver.keep_last is None:
        return []
    where = f"{path}.keep_last"
    if saver.keep_last < 1:
        return [f"{where}: must be at least 1 (got {saver.keep_last}); null keeps every file"]
    if not isinstance(saver, LocalSaveConfig):
        return [
            f"{where}: only local savers delete old saves; a {saver.save_to} saver keeps its files (each save "
            "is a new version there, so deleting frees nothing)"
        ]
    if not template_fields(saver.save_latest_to):
        return [
            f"{where}: needs a save_latest_to that names a field such as {{epoch}} or {{samples_seen}} (got "
            f"{saver.save_latest_to!r}: one file, replaced at each save)"
        ]
    return []
