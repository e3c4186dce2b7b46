"""Tracking: logging metrics and samples, loading the start checkpoint, saving checkpoints and models.

`create_tracker(config.tracker, full_config_dict=..., is_main_process=...)` is the entry point;
docs/TRACKING.md describes the protocol between the trainer and the tracker.
"""

from .checkpoint import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    LoadedCheckpoint,
    capture_rng_state,
    load_state_dict_checked,
    read_file,
    restore_rng_state,
    save_checkpoint,
    save_model,
)
from .loaders import LoadError
from .model_weights import load_model_weights
from .redact import redact
from .run_state import DataPathError, RunState, read_run_state
from .savers import SaveError
from .tracker import NullTracker, Tracker, TrackerSetupError, create_tracker

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "DataPathError",
    "LoadError",
    "LoadedCheckpoint",
    "NullTracker",
    "RunState",
    "SaveError",
    "Tracker",
    "TrackerSetupError",
    "capture_rng_state",
    "create_tracker",
    "load_model_weights",
    "load_state_dict_checked",
    "read_file",
    "read_run_state",
    "redact",
    "restore_rng_state",
    "save_checkpoint",
    "save_model",
]
