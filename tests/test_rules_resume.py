"""Resume with each config option changed: applied or refused as docs/TRACKING.md says, at every position.

The table below classifies every option of the resolved config by hand, from the documented
rule: everything is applied, except that the position inside an epoch cannot be kept when the
change alters which samples that epoch's batches hold (the data, the batch size, the seed, the
workers that interleave the batches, the shuffle); then that epoch's
training restarts from its first batch. Between epochs (at an epoch's start, or once its
training is done) every change is applied. A new option makes the table test fail until it is
given a row.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, Tuple

import pytest

from dalle2_decoder.config import TrainDecoderConfig
from dalle2_decoder.training.resume import describe_changes, position_is_kept
from dalle2_decoder.training.state import Phase, Progress

# Options whose change moves the samples of an epoch's batches: refused in the middle of an epoch.
MOVES_THE_BATCHES = {
    "seed",
    "data.webdataset_base_url",
    "data.img_embeddings_url",
    "data.text_embeddings_url",
    "data.embeddings_in_shards",
    "data.num_workers",
    "data.batch_size",
    "data.start_shard",
    "data.end_shard",
    "data.shard_width",
    "data.index_width",
    "data.splits.train",
    "data.splits.val",
    "data.splits.test",
    "data.shuffle_train",
    "data.resample_train",
    "data.shuffle_buffer",
    "data.skip_missing_shards",
}
# Options applied at any position (the same samples in the same batches; or not about the data).
APPLIED_ANYWHERE = {
    "data.preprocessing.ToTensor",
    "data.max_bad_sample_fraction",
    *(
        f"decoder.{name}"
        for name in (
            "unets",
            "image_sizes",
            "image_size",
            "clip",
            "channels",
            "timesteps",
            "sample_timesteps",
            "samplers",
            "loss_type",
            "beta_schedule",
            "learned_variance",
            "image_cond_drop_prob",
            "text_cond_drop_prob",
        )
    ),
    *(f"tracker.log.{name}" for name in ("log_type", "resume", "auto_resume", "verbose")),
    "tracker.save",
    "tracker.data_path",
    "tracker.overwrite_data_path",
    "tracker.upload_retries",
    "tracker.progress_interval_s",
    *(
        f"train.{name}"
        for name in (
            "epochs",
            "lr",
            "wd",
            "max_grad_norm",
            "save_every_n_samples",
            "n_sample_images",
            "cond_scale",
            "device",
            "epoch_samples",  # a capped epoch's position is how far it got: applied even when it ends it
            "validation_samples",
            "save_immediately",
            "use_ema",
            "ema_beta",
            "ema_update_after_step",
            "ema_update_every",
            "ema_warmup",
            "amp",
            "mixed_precision",
            "group_wd_params",
            "unet_training_mask",
            "warmup_steps",
            "lr_schedule",
            "lr_min_ratio",
            "lr_decay_steps",
            "posthoc_ema_sigma_rels",
            "posthoc_ema_every_n_steps",
            "gradient_accumulation_steps",
            "find_unused_parameters",
            "static_graph",
        )
    ),
    *(f"evaluate.{name}" for name in ("n_evaluation_samples", "FID", "IS", "KID", "LPIPS")),
    *(f"evaluate.fidelity.{name}" for name in ("enabled", "clip", "coarse_size")),
    # A recipe only fills in options; the options it filled are in the saved config and compared as options.
    "recipe",
}
# The checkpoint named is how the run got here: not a change to report.
NOT_REPORTED = {"tracker.load"}

POSITIONS = {
    "start of an epoch": Progress(epoch=2, batches_in_epoch=0, phase=Phase.TRAIN),
    "middle of an epoch": Progress(epoch=2, batches_in_epoch=5, phase=Phase.TRAIN),
    "end of an epoch's training": Progress(epoch=2, batches_in_epoch=9, phase=Phase.VALIDATE),
    "stopped in the evaluation": Progress(epoch=2, batches_in_epoch=9, phase=Phase.EVALUATE),
    "stopped in the sample grids": Progress(epoch=2, batches_in_epoch=9, phase=Phase.SAMPLE),
    "stopped in a periodic sample grid": Progress(epoch=2, batches_in_epoch=5, phase=Phase.TRAIN, periodic_due=True),
}


def leaves(value: Any, path: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted option path, value) of every option; lists are one option."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}" if path else key)
    else:
        yield path, value


def with_leaf(config: Dict[str, Any], path: str, value: Any) -> Dict[str, Any]:
    changed = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = changed
    for key in parents:
        node = node[key]
    node[last] = value
    return changed


def another(value: Any) -> Any:
    """A different value of the same kind (describe_changes compares values, it does not check them)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value / 2 + 0.125
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return value + value[:1] if value else [1]
    if value is None:
        return 7
    if isinstance(value, dict):
        return {**value, "other": 1}
    raise AssertionError(type(value))


@pytest.fixture
def saved(minimal_config) -> Dict[str, Any]:
    """The resolved config (every default filled in) a checkpoint was saved with."""
    return TrainDecoderConfig.from_dict(minimal_config).to_dict()


@pytest.mark.parametrize("where", sorted(POSITIONS))
def test_each_option_changed_alone_is_applied_or_refused_as_documented(saved, where):
    """Every option of the resolved config has a row in the table above. One option changed at a
    time, at each position a checkpoint can hold: exactly that option
    is reported, in one line `config change on resume: <option>: <old> -> <new>: applied (...)`
    or `refused (...)`; refused only in the middle of an epoch and only for options that move the
    batches (the refusal says the epoch restarts from its first batch); `position_is_kept` is false
    exactly for the seed and data options ("the saved random-number states are not restored")."""
    options = {path for path, _ in leaves(saved)}
    unclassified = options - (MOVES_THE_BATCHES | APPLIED_ANYWHERE | NOT_REPORTED)
    assert unclassified == set(), "give these new options a row in tests/test_rules_resume.py"
    assert not MOVES_THE_BATCHES & APPLIED_ANYWHERE
    progress = POSITIONS[where]
    checked = 0
    for path, value in leaves(saved):
        current = with_leaf(saved, path, another(value))
        changes = describe_changes(saved, current, epoch=progress.epoch, mid_epoch=progress.mid_epoch)
        if path in NOT_REPORTED:
            assert changes == [], path
            continue
        assert [c.path for c in changes] == [path]
        change = changes[0]
        line = change.line()
        assert "\n" not in line and line.startswith(f"config change on resume: {path}: ")
        refused = progress.mid_epoch and path in MOVES_THE_BATCHES
        assert change.applied is not refused, (where, path, line)
        assert line.endswith(")") and (": refused (" in line) is refused and (": applied (" in line) is not refused
        if refused:
            assert f"epoch {progress.epoch + 1}" in line and "restarts from its first batch" in line
        # any data option or the seed: the batches drawn from now on differ, so the saved RNG states are unused
        assert position_is_kept(changes) is not (path == "seed" or path.startswith("data.")), path
        checked += 1
    assert checked >= 60


def test_several_changes_are_each_judged_and_any_refusal_restarts_the_epoch(saved):
    """Changes come one line each, sorted by option; a mix of refused and applied ones is judged
    one by one (the position is then not kept: one refusal is enough)."""
    current = with_leaf(saved, "train.lr", 3e-4)
    current = with_leaf(current, "data.num_workers", 1)
    current = with_leaf(current, "seed", 5)
    changes = describe_changes(saved, current, epoch=0, mid_epoch=True)
    assert [(c.path, c.applied) for c in changes] == [
        ("data.num_workers", False),
        ("seed", False),
        ("train.lr", True),
    ]
    assert not position_is_kept(changes)
    assert describe_changes(saved, copy.deepcopy(saved), epoch=0, mid_epoch=True) == []


@pytest.mark.parametrize("where", sorted(POSITIONS))
def test_a_reference_checkpoint_is_compared_on_the_options_both_packages_have(saved, where):
    """A DALLE2-pytorch checkpoint's config is compared on `seed`, `train.*` and `data.batch_size`
    only (its other sections differ by design), with the same verdicts; an option only one
    package has is not reported."""
    progress = POSITIONS[where]
    for path, value in leaves(saved):
        current = with_leaf(saved, path, another(value))
        changes = describe_changes(saved, current, epoch=progress.epoch, mid_epoch=progress.mid_epoch, reference=True)
        compared = path == "seed" or path.startswith("train.") or path == "data.batch_size"
        assert [c.path for c in changes] == ([path] if compared else []), path
        if compared:
            assert changes[0].applied is not (progress.mid_epoch and path in MOVES_THE_BATCHES), path
    only_ours = {k: v for k, v in saved.items() if k != "seed"}
    assert describe_changes(saved, only_ours, epoch=0, mid_epoch=True, reference=True) == []


def test_fewer_epochs_than_done_is_applied_and_says_nothing_is_left():
    """`train.epochs` lowered to or below the epochs already done: applied, and the line says
    nothing is left to train; raised: the run continues into the next epoch and ends at the new count."""
    for new, done, phrase in [
        (2, 3, "nothing is left to train"),
        (3, 3, "nothing is left to train"),
        (9, 3, "ends after epoch 9"),
    ]:
        (change,) = describe_changes({"train": {"epochs": 5}}, {"train": {"epochs": new}}, epoch=done, mid_epoch=False)
        assert change.applied and phrase in change.line()
