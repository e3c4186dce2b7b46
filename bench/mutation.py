"""Mutation bench: plant small bugs one at a time in a copy of the package and check the tests catch them.

Each mutant is a list of exact source edits (every `old` text must occur exactly once, so a stale
mutant is reported, never silently skipped) and the few test files (with -k filters) that must
fail with it. The working tree is never touched: the repository's tracked and new files are
copied to a temporary folder once, and each mutant is applied to, and reverted in, that copy.

    python bench/mutation.py                # every mutant
    python bench/mutation.py --only ema     # mutants whose name contains "ema"
    python bench/mutation.py --list
    python bench/mutation.py --before       # the mutants that name them, against their `before` tests
    python bench/mutation.py --property-block --every-test   # issue 29's block: every test each one fails

Prints caught / missed per mutant and a summary; the exit status is 1 when any mutant is missed
or stale. Not part of `make test` (it runs the relevant tests once per mutant: tens of minutes on
2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    edits: Sequence[Tuple[str, str, str]]
    """(file, old text, new text), each old text occurring exactly once in its file."""
    tests: Sequence[str]
    """pytest arguments: test files or node ids, optionally followed by `-k` expressions."""
    k: str = ""
    before: Sequence[str] = ()
    """The test files a maintainer would have picked before the property suite (`--before` runs
    these instead of `tests`, without `k`): what the mutant's catch rests on, measured."""


T_MODELS = "tests/test_reliability_models.py"
T_TRACK = "tests/test_reliability_tracking.py"
T_LOOP = "tests/test_reliability_loop.py"
T_DATA = "tests/test_reliability_data.py"
T_LOADER = "tests/test_data_loader.py"
T_TRAINER = "tests/test_training_trainer.py"
T_EMA = "tests/test_training_trainer.py::test_ema_follows_dalle2_pytorchs_rule_by_default"
T_TRAINLOOP = "tests/test_training_loop.py"
T_DIFF = "tests/test_models_diffusion.py"
T_DEC = "tests/test_models_decoder.py"
T_CONSOLE = "tests/test_tracking_console.py"
T_STOPPING = "tests/test_stopping.py"
T_STOP_CHAINS = "tests/test_stop_signals.py::test_stops_in_every_phase_then_resumes_to_the_run_never_stopped"
T_EVAL = "tests/test_evaluation_metrics.py"
T_HUB = "tests/test_tracking_huggingface.py"

SCHED = "dalle2_decoder/models/schedules.py"
UNET = "dalle2_decoder/models/unet.py"
DEC_SAMPLING = "dalle2_decoder/models/decoder_sampling.py"
EMA = "dalle2_decoder/training/ema.py"
PLAN = "dalle2_decoder/data/plan.py"
LOOP = "dalle2_decoder/training/loop.py"
STOP = "dalle2_decoder/stopping.py"
SIGNALS = "dalle2_decoder/common/signals.py"
LOADER = "dalle2_decoder/data/loader.py"
SAVERS = "dalle2_decoder/tracking/savers.py"
CKPT = "dalle2_decoder/tracking/checkpoint.py"
STATE = "dalle2_decoder/tracking/run_state.py"
TRACKER = "dalle2_decoder/tracking/tracker.py"
BUILD = "dalle2_decoder/tracking/build.py"
DESTINATIONS = "dalle2_decoder/tracking/destinations.py"
TRACKER_CONFIG = "dalle2_decoder/config/tracker.py"
FILES = "dalle2_decoder/common/files.py"
REDACT = "dalle2_decoder/tracking/redact.py"
METRICS = "dalle2_decoder/evaluation/metrics.py"
TRAINER = "dalle2_decoder/training/trainer.py"

MUTANTS: List[Mutant] = [
    # --- diffusion math --------------------------------------------------------------------
    Mutant(
        "linear schedule end point 0.02 -> 0.021",
        "diffusion",
        [(SCHED, "return scale * 1e-4, scale * 0.02", "return scale * 1e-4, scale * 0.021")],
        [T_MODELS],
        "schedule",
    ),
    Mutant(
        "cosine schedule offset s 0.008 -> 0.01",
        "diffusion",
        [
            (
                SCHED,
                "def cosine_beta_schedule(timesteps: int, s: float = 0.008)",
                "def cosine_beta_schedule(timesteps: int, s: float = 0.01)",
            )
        ],
        [T_MODELS],
        "schedule",
    ),
    Mutant(
        "jsd schedule off by one",
        "diffusion",
        [(SCHED, "1.0 / torch.linspace(timesteps, 1, timesteps", "1.0 / torch.linspace(timesteps + 1, 2, timesteps")],
        [T_MODELS],
        "schedule",
    ),
    Mutant(
        "quadratic schedule squares the ends, not their roots",
        "diffusion",
        [
            (
                SCHED,
                "torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2",
                "torch.linspace(start, end, timesteps, dtype=torch.float64)",
            )
        ],
        [T_MODELS],
        "schedule",
    ),
    Mutant(
        "sigmoid schedule range -6..6 -> -5..6",
        "diffusion",
        [(SCHED, "low: float = -6.0", "low: float = -5.0")],
        [T_MODELS],
        "schedule",
    ),
    Mutant(
        "Decoder.sample ignores cond_scale",
        "diffusion",
        [
            # the one denoiser every sampling chain calls
            (
                DEC_SAMPLING,
                "out = unet.forward_with_cond_scale(x, t, cond_scale=cond_scale,",
                "out = unet.forward_with_cond_scale(x, t, cond_scale=1.0,",
            ),
        ],
        [T_MODELS],
        "guides",
    ),
    Mutant(
        "Decoder.sample uses the first U-Net's scale for all",
        "diffusion",
        [(DEC_SAMPLING, "cond_scale=cond_scales[index],", "cond_scale=cond_scales[0],")],
        [T_MODELS],
        "guides",
    ),
    Mutant(
        "guidance centred on cond instead of null",
        "diffusion",
        [(UNET, "guided = null + (cond - null) * cond_scale", "guided = cond + (cond - null) * cond_scale")],
        [T_MODELS],
        "guides",
    ),
    Mutant(
        "train.cond_scale not passed to the sample grids",
        "diffusion",
        [
            (
                LOOP,
                "self.cond_scale = per_unet(config.train.cond_scale, len(config.decoder.unets))",
                "self.cond_scale = per_unet(1.0, len(config.decoder.unets))",
            )
        ],
        [T_LOOP],
        "cond_scale",
    ),
    Mutant(
        "U-Net option scale_skip_connection silently ignored",
        "diffusion",
        [
            (
                UNET,
                "self.skip_connect_scale = 2**-0.5 if scale_skip_connection else 1.0",
                "self.skip_connect_scale = 1.0",
            )
        ],
        ["tests/test_options_table.py"],
        "scale_skip",
    ),
    # --- EMA --------------------------------------------------------------------------------
    Mutant(
        "EMA moves away from the weights",
        "ema",
        [
            (
                EMA,
                "        average_into(ema_params, new_params, decay)",
                "        average_into(ema_params, new_params, 1.0 - decay)",
            )
        ],
        [T_EMA],
    ),
    Mutant(
        "EMA warm-up ignored (decay = beta from the first step)",
        "ema",
        [(EMA, "    return min(max(value, 0.0), beta)", "    return beta")],
        [T_EMA],
    ),
    Mutant("EMA update count not advanced", "ema", [(EMA, "        self.num_updates += 1\n", "")], [T_EMA]),
    # --- data sharding ----------------------------------------------------------------------
    Mutant(
        "capped epochs: every rank reads the same shards",
        "sharding",
        [(PLAN, "shards = tuple(order[rank * workers + worker :: slots])", "shards = tuple(order[worker::workers])")],
        [T_DATA],
    ),
    Mutant(
        "capped epochs: workers of a rank share shards",
        "sharding",
        [(PLAN, "shards = tuple(order[rank * workers + worker :: slots])", "shards = tuple(order[rank::world_size])")],
        [T_DATA],
    ),
    Mutant(
        "exact epochs: every rank reads the first range",
        "sharding",
        [
            (
                PLAN,
                "start, stop = rank * per_rank + local_start, rank * per_rank + local_stop",
                "start, stop = local_start, local_stop",
            )
        ],
        [T_LOADER],
        "two_ranks",
    ),
    Mutant(
        "exact epochs: worker batch split drops the remainder",
        "sharding",
        [(PLAN, "return first, base + (1 if worker < extra else 0)", "return first, base")],
        [T_LOADER],
        "two_ranks or every_sample_once",
    ),
    # --- resume -----------------------------------------------------------------------------
    Mutant(
        "resume restarts the progress counters",
        "resume",
        [(LOOP, "        self.progress = progress\n", "        self.progress = Progress()\n")],
        [T_TRAINLOOP],
        "same_weights",
    ),
    Mutant(
        "resume does not skip the batches already trained on",
        "resume",
        [
            (
                LOOP,
                "for _ in range(min(progress.batches_in_epoch, len(loader))):\n                next(batches)",
                "for _ in range(0):\n                next(batches)",
            )
        ],
        [T_TRAINLOOP],
        "same_weights",
    ),
    Mutant(
        "resume does not restore the RNG states",
        "resume",
        [
            (
                LOOP,
                "                next(batches)\n            if self._pending_rng is not None:\n"
                "                self._restore_rng(self._pending_rng)\n",
                "                next(batches)\n            if self._pending_rng is not None:\n",
            )
        ],
        [T_TRAINLOOP],
        "same_weights",
    ),
    Mutant(
        "a signal stops without saving",
        "resume",
        [
            (
                LOOP,
                "            self._save_phase(is_best=False, rng=self._rng_mark)\n"
                '            saved = "checkpoint saved"',
                '            saved = "checkpoint saved"',
            )
        ],
        [T_TRAINLOOP],
        "same_weights",
    ),
    # --- checkpoint safety ------------------------------------------------------------------
    Mutant(
        "latest/best placed by a plain copy",
        "checkpoint",
        [
            (
                SAVERS,
                "    return atomic_write(target, place)",
                "    shutil.copyfile(source, target)\n    return target",
            )
        ],
        [T_TRACK],
        "placement",
    ),
    Mutant(
        "run_state.json renamed without fsync",
        "checkpoint",
        [(FILES, "            os.fsync(handle.fileno())\n", "            pass\n")],
        [T_TRACK],
        "disk_before",
    ),
    Mutant(
        "unreadable run_state.json taken for no run",
        "checkpoint",
        [
            (
                STATE,
                '        raise DataPathError(f"{path} cannot be read ({error}); {how}") from error',
                "        return None",
            )
        ],
        [T_TRACK],
        "unreadable",
    ),
    Mutant(
        "overwrite_data_path removes protected files too",
        "checkpoint",
        [
            (
                STATE,
                "(keep if any(_inside(item, resolved) for item in protected) else remove).append(child)",
                "remove.append(child)",
            )
        ],
        [T_TRACK],
        "overwrite",
    ),
    Mutant(
        "overwrite_data_path empties the whole folder",
        "checkpoint",
        [(STATE, "        if not ours:\n            continue\n", "")],
        [T_TRACK],
        "overwrite",
    ),
    Mutant(
        "stray staging not cleaned at setup",
        "checkpoint",
        [(BUILD, "    stray = clean_staging(data_path, local_destinations(config, data_path))", "    stray = []")],
        [T_TRACK],
        "placement",
    ),
    Mutant(
        "stray staging not cleaned at the end of a run",
        "checkpoint",
        [
            (
                TRACKER,
                "                clean_staging(self.data_path, local_destinations(self.config, self.data_path))",
                "                pass",
            )
        ],
        [T_TRACK],
        "no_staging",
    ),
    Mutant(
        "samples_seen counts a short batch as full",
        "checkpoint",
        [
            (
                LOOP,
                "step_samples = global_sizes[progress.batches_in_epoch]",
                "step_samples = global_sizes[0]",
            )
        ],
        [T_LOOP],
        "short_last_batch",
    ),
    # --- secrets ----------------------------------------------------------------------------
    Mutant(
        "hub token from token_path not a secret",
        "secrets",
        [
            (
                BUILD,
                "    known_secrets = secrets_in(dict(full_config_dict)) + list(hub_tokens.values())",
                "    known_secrets = secrets_in(dict(full_config_dict))",
            ),
        ],
        [T_TRACK],
        "secret",
    ),
    Mutant(
        "printed output not redacted",
        "secrets",
        [(REDACT, "        if isinstance(text, str):\n            text = self._redactor.text(text)\n", "")],
        [T_TRACK],
        "secret",
    ),
    Mutant(
        "logging not redacted",
        "secrets",
        [(REDACT, "            handler.addFilter(_RedactingFilter(redactor))", "            pass")],
        [T_TRACK],
        "secret",
    ),
    Mutant(
        "URL passwords kept",
        "secrets",
        [(REDACT, "text = _URL_PASSWORD.sub(lambda match: f\"{match['head']}:{MASK}@\", text)", "text = text")],
        # the end-to-end test's passwords are also known secrets (masked anyway): the pattern itself
        # is pinned where a config is redacted without them
        [T_TRACK, T_CONSOLE],
        "secret",
    ),
    Mutant(
        "secret config values masked only under their key",
        "secrets",
        [(REDACT, "            if secret_key and item:\n                found.append(item)\n", "")],
        [T_TRACK],
        "secret",
    ),
    Mutant(
        "environment secrets not masked",
        "secrets",
        [(REDACT, "        return self._secrets + secrets_from_environment()", "        return list(self._secrets)")],
        [T_TRACK],
        "secret",
    ),
    Mutant(
        "command line recorded by wandb unmasked",
        "secrets",
        [(BUILD, "    sys.argv = [OUTPUT.text(arg) for arg in sys.argv]", "    sys.argv = list(sys.argv)")],
        [T_TRACK],
        "wandb",
    ),
    # --- metric pooling ---------------------------------------------------------------------
    Mutant(
        "training loss logged as the window's last value",
        "pooling",
        [(LOOP, "loss_sums[number] += loss", "loss_sums[number] = loss")],
        [T_LOOP],
        "short_last_batch",
    ),
    Mutant(
        "LPIPS-style mean pooled without the count",
        "pooling",
        [
            (
                METRICS,
                'dist_reduce_fx="sum")\n        self.add_state("count", torch.zeros((), dtype=torch.long), '
                'dist_reduce_fx="sum")\n\n',
                'dist_reduce_fx="sum")\n        self.add_state("count", torch.zeros((), dtype=torch.long), '
                'dist_reduce_fx="max")\n\n',
            )
        ],
        ["tests/test_evaluation_distributed.py"],
        "pooled",
    ),
    # --- signal handling --------------------------------------------------------------------
    Mutant(
        "SIGUSR1 not handled",
        "signals",
        [
            (
                SIGNALS,
                "STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)",
                "STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)",
            )
        ],
        [T_STOPPING],
        "each_stop_signal or documented",
    ),
    Mutant(
        "a signal is recorded but never honoured",
        "signals",
        [(STOP, "        self.signal_name = signal.Signals(signum).name\n", "")],
        [T_STOPPING],
        "each_stop_signal",
    ),
    Mutant(
        "a signal to one rank stops that rank alone",
        "signals",
        [
            (
                STOP,
                "        if accelerator is None or accelerator.num_processes == 1:\n"
                "            return self.signal_name\n",
                "        return self.signal_name\n",
            )
        ],
        ["tests/test_reliability_signals.py"],
    ),
    Mutant(
        "dataloader workers die of a stop signal sent to the group",
        "signals",
        [(LOADER, "worker_init_fn=leave_stop_signals_to_parent if self.num_workers > 0 else None,", "")],
        [T_STOPPING],
        "survive",
    ),
    Mutant(
        "dataloader workers ignore their own parent's SIGTERM (a process exiting with workers up hangs)",
        "signals",
        [(SIGNALS, "        if info.si_signo == signal.SIGTERM and info.si_pid == parent:", "        if False:")],
        [T_STOPPING],
        "parents_sigterm or workers_up",
    ),
    Mutant(
        "a second Ctrl-C never interrupts",
        "signals",
        [(STOP, "                raise KeyboardInterrupt  # a second", "                return  # a second")],
        [T_STOPPING],
        "second_ctrl_c",
    ),
    Mutant(
        "torch's worker-death handler stays in place during a stop",
        "signals",
        [(STOP, "        self._set_aside_worker_failure_handler()\n", "")],
        [T_STOPPING],
        "worker_death",
    ),
    Mutant(
        "validation does not look for a stop",
        "signals",
        [(LOOP, "for batch in self.stop.batches(loader, acc, Phase.VALIDATE.label):", "for batch in loader:")],
        [T_STOP_CHAINS],
        "1-process",
    ),
    Mutant(
        "sample grids do not look for a stop",
        "signals",
        [(LOOP, "used_unets(self.config), on_unet_call=check", "used_unets(self.config), on_unet_call=None")],
        [T_STOP_CHAINS],
        "1-process",
    ),
    Mutant(
        "a stop saves the random state of its stop, not of the point the progress describes",
        "signals",
        [(LOOP, "self._save_phase(is_best=False, rng=self._rng_mark)", "self._save_phase(is_best=False)")],
        [T_STOP_CHAINS],
        "1-process",
    ),
    Mutant(
        "non-finite streak never stops the run",
        "signals",
        [(LOOP, "                if trainer.too_many_nonfinite:", "                if False:")],
        [T_LOOP],
        "nonfinite",
    ),
]


# === Issue 29: bugs next to the cases the example tests check ======================================
# Written before tests/test_properties_*.py and tests/test_rules_*.py, in the kinds an independent
# round found the example-based suite missing: counts that do not divide evenly, caps that bind
# late, other spellings of a name, data placed elsewhere, combinations not tried together. `before`
# names the test files a maintainer would have picked for each (`--before` runs those): see
# docs/TESTING.md for the counts.

T_PROP_DATA = "tests/test_properties_data.py"
T_PROP_SCHED = "tests/test_properties_schedules.py"
T_PROP_LOWRES = "tests/test_properties_lowres.py"
T_RULE_RESUME = "tests/test_rules_resume.py"
T_RULE_SECRETS = "tests/test_rules_secrets.py"
T_RULE_PATHS = "tests/test_rules_data_path.py"
T_RULE_NAMES = "tests/test_rules_reference_names.py"
GDIFF = "dalle2_decoder/models/gaussian_diffusion.py"
SAMPLERS = "dalle2_decoder/models/samplers/base.py"
SOLVERS = "dalle2_decoder/models/samplers/solvers.py"
LOWRES = "dalle2_decoder/models/lowres.py"
RESUME = "dalle2_decoder/training/resume.py"
PREFLIGHT = "dalle2_decoder/preflight.py"
REFNAMES = "dalle2_decoder/models/reference_names.py"
REFERENCE = "dalle2_decoder/tracking/reference.py"

PROPERTY_MUTANTS: List[Mutant] = [
    # --- uneven division ---------------------------------------------------------------------
    Mutant(
        "exact epochs: a worker's first batch ignores the extra batches of the workers before it",
        "sharding",
        [(PLAN, "first = worker * base + min(worker, extra)", "first = worker * base")],
        [T_PROP_DATA],
        before=[T_LOADER, T_DATA],
    ),
    Mutant(
        "exact epochs: a rank's short last batch runs on into the next rank's share",
        "sharding",
        [
            (
                PLAN,
                "local_stop = min((first_batch + count) * batch_size, per_rank)",
                "local_stop = (first_batch + count) * batch_size",
            )
        ],
        [T_PROP_DATA],
        before=[T_LOADER, T_DATA],
    ),
    Mutant(
        "exact epochs: the per-rank share rounded to nearest, not down",
        "sharding",
        [(PLAN, "    return total // world_size", "    return round(total / world_size)")],
        [T_PROP_DATA],
        before=[T_LOADER, T_DATA],
    ),
    Mutant(
        "capped epochs: a cap that is no multiple of ranks x batch size rounds up",
        "sharding",
        [(PLAN, "n = limit // (world_size * batch_size)", "n = -(-limit // (world_size * batch_size))")],
        [T_PROP_DATA],
        before=[T_LOADER, T_DATA],
    ),
    Mutant(
        "splits: leftover shards go to the smallest remainders",
        "sharding",
        [(PLAN, "key=lambda i: counts[i] - exact[i]", "key=lambda i: exact[i] - counts[i]")],
        [T_PROP_DATA],
        before=[T_LOADER, T_DATA],
    ),
    Mutant(
        "evaluation: each rank's share rounded down",
        "pooling",
        [(METRICS, "return math.ceil(n_samples / world_size)", "return n_samples // world_size")],
        [T_PROP_DATA],
        before=["tests/test_evaluation_distributed.py", "tests/test_evaluation_run.py"],
    ),
    # --- caps that bind late, cadences off the defaults -----------------------------------------
    Mutant(
        "EMA decay not capped at ema_beta (binds after about 1000 updates at 0.99)",
        "ema",
        [(EMA, "    return min(max(value, 0.0), beta)", "    return max(value, 0.0)")],
        [T_PROP_SCHED],
        before=[T_TRAINER],
    ),
    Mutant(
        "EMA cadence counted from update_after_step (same only when every divides it)",
        "ema",
        [
            (
                EMA,
                "        elif n % self.update_every == 0:",
                "        elif (n - self.update_after_step) % self.update_every == 0:",
            )
        ],
        [T_PROP_SCHED],
        before=[T_TRAINER],
    ),
    Mutant(
        "a restored optimizer gets the full rate in the middle of its warm-up",
        "schedules",
        [(TRAINER, "factor = scheduler.lr_lambdas[0](scheduler.last_epoch)", "factor = 1.0")],
        [T_PROP_SCHED],
        before=[T_TRAINER, "tests/test_training_resume.py"],
    ),
    Mutant(
        "linear beta range scaled by integer division (1000 // timesteps)",
        "schedules",
        [(SCHED, "scale = 1000.0 / timesteps", "scale = 1000 // timesteps")],
        [T_PROP_SCHED],
        before=[T_MODELS, T_DIFF],
    ),
    Mutant(
        "sampler timesteps truncated instead of rounded",
        "schedules",
        [
            (
                SAMPLERS,
                "steps=steps + 1, dtype=torch.float64).round().long().tolist()",
                "steps=steps + 1, dtype=torch.float64).long().tolist()",
            )
        ],
        [T_PROP_SCHED],
        before=["tests/test_samplers.py"],
    ),
    Mutant(
        "DDIM keeps repeated timesteps when the steps approach T",
        "schedules",
        [
            (
                SAMPLERS,
                "return [(a, b) for a, b in zip(times[:-1], times[1:]) if a > b]",
                "return [(a, b) for a, b in zip(times[:-1], times[1:]) if a >= b]",
            )
        ],
        [T_PROP_SCHED],
        before=[T_DIFF, "tests/test_samplers.py", T_DEC],
    ),
    Mutant(
        "Karras noise levels called at the timestep below, not the nearest",
        "schedules",
        [
            (
                SAMPLERS,
                "times.append(int(round(low + min(max(w, 0.0), 1.0))))",
                "times.append(int(low + min(max(w, 0.0), 1.0)))",
            )
        ],
        [T_PROP_SCHED],
        before=["tests/test_samplers.py"],
    ),
    Mutant(
        "blur kernel size range leaves out its upper end",
        "lowres",
        [
            (
                LOWRES,
                "size = int(torch.randint(int(size[0]), int(size[1]) + 1, ()))",
                "size = int(torch.randint(int(size[0]), int(size[1]), ()))",
            )
        ],
        [T_PROP_LOWRES],
        before=[T_DEC, "tests/test_reference_parity_decoder.py"],
    ),
    Mutant(
        "even blur kernel sizes rounded down, not up",
        "lowres",
        [(LOWRES, "                kernel_size += 1", "                kernel_size -= 1")],
        [T_PROP_LOWRES],
        before=[T_DEC, "tests/test_reference_parity_decoder.py"],
    ),
    Mutant(
        "augmentation noise level never 0",
        "lowres",
        [
            (
                LOWRES,
                "0, LOWRES_NOISE_TIMESTEPS, (cond.shape[0],)",
                "1, LOWRES_NOISE_TIMESTEPS, (cond.shape[0],)",
            )
        ],
        [T_PROP_LOWRES],
        before=[T_DEC, "tests/test_reference_parity_decoder.py"],
    ),
    # --- other config changes on resume ----------------------------------------------------------
    # (rewritten after the resume fix of this round moved the rule to SAME_BATCHES: the same two bugs)
    Mutant(
        "resume: a seed change keeps the position inside the epoch",
        "resume",
        [
            (
                RESUME,
                "if mid_epoch and not path.startswith(SAME_BATCHES):",
                'if mid_epoch and path != "seed" and not path.startswith(SAME_BATCHES):',
            )
        ],
        [T_RULE_RESUME],
        before=["tests/test_training_resume.py"],
    ),
    Mutant(
        "resume: an end_shard change keeps the position inside the epoch",
        "resume",
        [
            (
                RESUME,
                'SAME_BATCHES = ("data.preprocessing", "data.max_bad_sample_fraction")',
                'SAME_BATCHES = ("data.preprocessing", "data.max_bad_sample_fraction", "data.end_shard")',
            )
        ],
        [T_RULE_RESUME],
        before=["tests/test_training_resume.py"],
    ),
    # --- other spellings of a name -------------------------------------------------------------
    Mutant(
        "camelCase keys not split into words (hfToken, accessToken)",
        "secrets",
        [(REDACT, 'spaced = re.sub(r"([a-z0-9])([A-Z])", r"\\1_\\2", name)', "spaced = name")],
        [T_RULE_SECRETS],
        before=[T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "'api key' not recognised as a secret pair (WANDB_API_KEY, x-api-key)",
        "secrets",
        [(REDACT, '_SECRET_PAIRS = {("api", "key"), ', "_SECRET_PAIRS = {")],
        [T_RULE_SECRETS],
        before=[T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "wrapper prefixes stripped once each, in one order (_orig_mod.module. left half-wrapped)",
        "reference",
        [
            (
                REFNAMES,
                "    changed = True\n    while changed:\n        changed = False\n"
                "        for prefix in _WRAPPER_PREFIXES:\n            if name.startswith(prefix):\n"
                "                name, changed = name[len(prefix) :], True\n",
                "    for prefix in _WRAPPER_PREFIXES:\n        if name.startswith(prefix):\n"
                "            name = name[len(prefix) :]\n",
            )
        ],
        [T_RULE_NAMES],
        before=["tests/test_reference_checkpoints.py", "tests/test_reference_parity_decoder.py"],
    ),
    Mutant(
        "wrapper prefixes inside a U-Net's names (compiled U-Net in a wrapped decoder) kept",
        "reference",
        [
            (
                REFNAMES,
                'out[f"unets.{index}.{_renamed(_strip_wrappers(rest))}"] = tensor',
                'out[f"unets.{index}.{_renamed(rest)}"] = tensor',
            )
        ],
        [T_RULE_NAMES],
        before=["tests/test_reference_checkpoints.py", "tests/test_reference_parity_decoder.py"],
    ),
    Mutant(
        "only DDP's prefix stripped (torch.compile's _orig_mod. kept)",
        "reference",
        [(REFNAMES, '_WRAPPER_PREFIXES = ("module.", "_orig_mod.")', '_WRAPPER_PREFIXES = ("module.",)')],
        [T_RULE_NAMES],
        before=["tests/test_reference_checkpoints.py", "tests/test_reference_parity_decoder.py"],
    ),
    # --- data placed elsewhere ------------------------------------------------------------------
    Mutant(
        "overwrite_data_path: save_meta_to folders not protected",
        "checkpoint",
        [
            (
                DESTINATIONS,
                "    paths += [dest.path for dest in local_save_destinations(config, data_path)]",
                "    paths += [dest.path for dest in local_save_destinations(\n"
                '        config, data_path, ("save_latest_to", "save_best_to")\n    )]',
            )
        ],
        [T_RULE_PATHS],
        before=[T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "overwrite_data_path: data folders given without a '{}' pattern not protected",
        "checkpoint",
        [
            (
                DESTINATIONS,
                '        text = value[len("file:") :] if value.startswith("file:") else value\n'
                '        if "/" in text or "{" in text:\n',
                '        text = value[len("file:") :] if value.startswith("file:") else value\n'
                '        if "{" in text:\n',
            )
        ],
        [T_RULE_PATHS],
        before=[T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "overwrite_data_path: a protected file inside a tracker entry does not keep the entry",
        "checkpoint",
        [
            (
                STATE,
                "(keep if any(_inside(item, resolved) for item in protected) else remove)",
                "(keep if any(item == resolved for item in protected) else remove)",
            )
        ],
        [T_RULE_PATHS],
        before=[T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "overwrite_data_path: relative save destinations resolved (and protected) against the working directory",
        "checkpoint",
        [
            (
                TRACKER_CONFIG,
                "    return Path(os.path.join(data_path, os.path.expanduser(dest)))",
                "    return Path(os.path.expanduser(dest))",
            )
        ],
        [T_RULE_PATHS],
        before=[T_TRACK, T_CONSOLE],
    ),
    # --- combinations not tried together ---------------------------------------------------------
    Mutant(
        "pre-flight accepts auto_resume over a finished run",
        "checkpoint",
        [
            (
                PREFLIGHT,
                "if previous is not None and not previous.finished and tracker.log.auto_resume:",
                "if previous is not None and tracker.log.auto_resume:",
            )
        ],
        [T_RULE_PATHS],
        before=["tests/test_cli_check.py", T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "auto_resume continues a finished run",
        "checkpoint",
        [
            (
                STATE,
                "    if auto_resume and previous is not None and not previous.finished:",
                "    if auto_resume and previous is not None:",
            )
        ],
        [T_RULE_PATHS],
        before=["tests/test_cli_check.py", T_TRACK, T_CONSOLE],
    ),
]
# The real bugs the new tests found (fixed in this round), planted back: the old suite missed each,
# since each was in the code it passed on.
PROPERTY_MUTANTS += [
    Mutant(
        "resume: a num_workers change keeps the position inside the epoch (fixed bug)",
        "resume",
        [
            (
                RESUME,
                'SAME_BATCHES = ("data.preprocessing", "data.max_bad_sample_fraction")',
                'SAME_BATCHES = ("data.preprocessing", "data.max_bad_sample_fraction", "data.num_workers")',
            )
        ],
        [T_RULE_RESUME],
        before=["tests/test_training_resume.py"],
    ),
    Mutant(
        "reference checkpoints: Adam moments looked up under the file's wrapped names (fixed bug)",
        "reference",
        [(REFERENCE, "mapped = _names().decoder_state_from_reference(state)", "mapped = state")],
        [T_RULE_NAMES],
        before=["tests/test_reference_checkpoints.py", "tests/test_reference_parity_decoder.py"],
    ),
    Mutant(
        "redaction: an acronym before a word not split, AWSAccessKey (fixed bug)",
        "secrets",
        [(REDACT, '    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\\1_\\2", spaced)', "    pass")],
        [T_RULE_SECRETS],
        before=[T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "redaction: a secret glued to its prefix not recognised, PGPASSWORD (fixed bug)",
        "secrets",
        [
            (
                REDACT,
                "word in _SECRET_WORDS or word.endswith(_GLUED_SECRET_ENDINGS) for word in words",
                "word in _SECRET_WORDS for word in words",
            )
        ],
        [T_RULE_SECRETS],
        before=[T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "pre-flight: overwrite_data_path passes before reading the run state or the folder's place (fixed bug)",
        "checkpoint",
        [
            (
                PREFLIGHT,
                "    if not os.path.isdir(data_path) or not os.listdir(data_path):\n        return None\n    try:",
                "    if tracker.overwrite_data_path or not os.path.isdir(data_path) or not os.listdir(data_path):\n"
                "        return None\n    try:",
            )
        ],
        [T_RULE_PATHS],
        before=["tests/test_cli_check.py", T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "pre-flight: an auto-resumed run whose checkpoint is gone passes (fixed bug)",
        "checkpoint",
        [
            (
                PREFLIGHT,
                "        if checkpoint and not (os.path.isfile(checkpoint) or is_sharded_folder(Path(checkpoint))):",
                "        if False:",
            )
        ],
        [T_RULE_PATHS],
        before=["tests/test_cli_check.py", T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "Karras samplers divide by zero on a one-timestep schedule (fixed bug)",
        "schedules",
        [
            (
                SAMPLERS,
                "        if len(ve) == 1:  # a one-timestep schedule",
                "        if False:  # a one-timestep schedule",
            )
        ],
        [T_PROP_SCHED],
        before=["tests/test_samplers.py"],
    ),
]
# Written after the tests, to test them: each new test must fail under some mutant, and these are
# the ones no mutant above reached (`--every-test` shows which test catches which).
PROPERTY_MUTANTS += [
    Mutant(
        "epoch order follows the listing order, not the shard numbers (test check)",
        "sharding",
        [(PLAN, "order = sorted(shards, key=lambda s: s.number)", "order = list(shards)")],
        [T_PROP_DATA],
        before=[T_LOADER, T_DATA],
    ),
    Mutant(
        "learning-rate warm-up one step behind (test check)",
        "schedules",
        [
            (
                "dalle2_decoder/training/lr_schedule.py",
                "return min(1.0, (step + 1) / warmup_steps)",
                "return min(1.0, max(step, 1) / warmup_steps)",
            )
        ],
        [T_PROP_SCHED],
        before=[T_TRAINER],
    ),
    Mutant(
        "sampler accepts more steps than timesteps (test check)",
        "schedules",
        [(SAMPLERS, "if not 1 <= steps <= num_timesteps:", "if not 1 <= steps <= num_timesteps + 1:")],
        [T_PROP_SCHED],
        before=["tests/test_samplers.py"],
    ),
    Mutant(
        "DPM-Solver++(2M) weighs the previous prediction by r, not 1/r (test check)",
        "schedules",
        [(SOLVERS, "data = x0 + (0.5 / r) * (x0 - previous)", "data = x0 + (0.5 * r) * (x0 - previous)")],
        [T_PROP_SCHED],
        before=["tests/test_samplers.py"],
    ),
    Mutant(
        "blur kernel exp(-x^2 / sigma^2), without the 2 (test check)",
        "lowres",
        [
            (
                LOWRES,
                "kernel = torch.exp(-(offsets**2) / (2 * float(sigma) ** 2))",
                "kernel = torch.exp(-(offsets**2) / (float(sigma) ** 2))",
            )
        ],
        [T_PROP_LOWRES],
        before=[T_DEC, "tests/test_reference_parity_decoder.py"],
    ),
    Mutant(
        "augmentation noise on the cosine schedule (test check)",
        "lowres",
        [
            (
                LOWRES,
                'GaussianDiffusion("linear", LOWRES_NOISE_TIMESTEPS)',
                'GaussianDiffusion("cosine", LOWRES_NOISE_TIMESTEPS)',
            )
        ],
        [T_PROP_LOWRES],
        before=[T_DEC, "tests/test_reference_parity_decoder.py"],
    ),
    Mutant(
        "resume: epochs lowered to those done still says epochs are left (test check)",
        "resume",
        [(RESUME, "if isinstance(new, int) and new <= epoch:", "if isinstance(new, int) and new < epoch:")],
        [T_RULE_RESUME],
        before=["tests/test_training_resume.py"],
    ),
    Mutant(
        "redaction: names ending in path are secrets too, token_path masked (test check)",
        "secrets",
        [(REDACT, '_NOT_SECRET_LAST = {"path", ', "_NOT_SECRET_LAST = {")],
        [T_RULE_SECRETS],
        before=[T_TRACK, T_CONSOLE],
    ),
    Mutant(
        "redaction: URL passwords masked for http(s) only (test check)",
        "secrets",
        [
            (
                REDACT,
                '_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://',
                '_URL_PASSWORD = re.compile(r"(?P<head>https?://',
            )
        ],
        [T_RULE_SECRETS],
        before=[T_TRACK, T_CONSOLE],
    ),
]
MUTANTS += PROPERTY_MUTANTS


def copy_tree(target: Path) -> None:
    """The repository's tracked and untracked-but-not-ignored files, copied to `target`."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def apply(root: Path, mutant: Mutant) -> List[Tuple[Path, str]]:
    """Apply the edits; return the original texts to restore. Raises ValueError for a stale mutant."""
    originals: dict = {}
    for file, old, new in mutant.edits:
        path = root / file
        text = path.read_text()
        originals.setdefault(path, text)
        count = text.count(old)
        if count != 1:
            raise ValueError(f"{file}: the text to change occurs {count} times (expected once): {old[:60]!r}")
        path.write_text(text.replace(old, new))
    return list(originals.items())


def run_tests(root: Path, mutant: Mutant, timeout: int, every_test: bool = False) -> Tuple[str, float, str]:
    """Run the mutant's tests in `root`; `every_test`: do not stop at the first failure, and return
    the ids of all failing tests as the last element (to check that every test catches some mutant)."""
    stop = [] if every_test else ["-x"]
    command = [
        sys.executable,
        "-m",
        "pytest",
        *mutant.tests,
        *stop,
        "-q",
        "-rf",
        "--timeout=600",
        "-p",
        "no:cacheprovider",
    ]
    if mutant.k:
        command += ["-k", mutant.k]
    # Property tests: the CI examples, without shrinking a failure (tests/conftest.py's `mutation` profile)
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1", "HYPOTHESIS_PROFILE": "mutation"}
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "caught (timeout)", time.perf_counter() - start, ""
    elapsed = time.perf_counter() - start
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
    if every_test:
        failed = [
            line[len("FAILED ") :].split(" - ")[0] for line in result.stdout.splitlines() if line.startswith("FAILED ")
        ]
        tail = ["; ".join(failed) or tail[0]]
    if result.returncode == 0:
        return "MISSED", elapsed, tail[0]
    if result.returncode in (4, 5):  # usage error / no tests collected: the mutant's test list is wrong
        return "NO TESTS", elapsed, tail[0]
    return "caught", elapsed, tail[0]


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutants whose name or area contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one mutant's tests")
    parser.add_argument("--check", action="store_true", help="only check that every mutant still applies (no tests)")
    parser.add_argument("--start", type=int, default=1, help="begin at this mutant number (of those chosen)")
    parser.add_argument("--baseline", action="store_true", help="first check that every listed test passes unmutated")
    parser.add_argument(
        "--property-block", action="store_true", help="only the issue-29 block (PROPERTY_MUTANTS, see docs/TESTING.md)"
    )
    parser.add_argument(
        "--every-test",
        action="store_true",
        help="run each mutant's tests to the end and print every failing test (which tests catch which mutants)",
    )
    parser.add_argument(
        "--before",
        action="store_true",
        help="run each mutant that names them against its `before` tests (the suite as it was) instead",
    )
    args = parser.parse_args(argv or None)
    pool = PROPERTY_MUTANTS if args.property_block else MUTANTS
    chosen = [m for m in pool if args.only.lower() in (m.name + " " + m.area).lower()]
    if args.before:
        chosen = [dataclasses.replace(m, tests=list(m.before), k="") for m in chosen if m.before]
    if args.list:
        for index, mutant in enumerate(chosen, start=1):
            print(
                f"{index:2d}. [{mutant.area}] {mutant.name}: {' '.join(mutant.tests)} "
                f"{('-k ' + mutant.k) if mutant.k else ''}"
            )
        return 0
    if args.check:
        stale = 0
        for index, mutant in enumerate(chosen, start=1):
            for file, old, _ in mutant.edits:
                count = (REPO / file).read_text().count(old)
                if count != 1:
                    stale += 1
                    print(f"{index:2d}. STALE [{mutant.area}] {mutant.name}: {file} has the text {count} times")
        print(f"{len(chosen) - stale} of {len(chosen)} mutants apply")
        return 1 if stale else 0
    print(f"{len(chosen)} mutants", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="dalle2-mutation-") as folder:
        root = Path(folder)
        copy_tree(root)
        if args.baseline:
            for tests in sorted({(tuple(m.tests), m.k) for m in chosen}):
                clean = Mutant("baseline", "", [], tests[0], tests[1])
                verdict, elapsed, tail = run_tests(root, clean, args.timeout)
                print(
                    f"baseline {' '.join(tests[0])} -k {tests[1]!r}: "
                    f"{'ok' if verdict == 'MISSED' else 'FAILING'} ({elapsed:.0f}s) {tail}",
                    flush=True,
                )
        for index, mutant in enumerate(chosen, start=1):
            if index < args.start:
                continue
            try:
                originals = apply(root, mutant)
            except ValueError as error:
                results.append((mutant, "STALE", 0.0))
                print(f"{index:2d}. STALE   [{mutant.area}] {mutant.name}: {error}", flush=True)
                continue
            try:
                verdict, elapsed, tail = run_tests(root, mutant, args.timeout, args.every_test)
            finally:
                for path, text in originals:
                    path.write_text(text)
            results.append((mutant, verdict, elapsed))
            print(f"{index:2d}. {verdict:8s}[{mutant.area}] {mutant.name} ({elapsed:.0f}s; {tail})", flush=True)
    caught = sum(1 for _, verdict, _ in results if verdict.startswith("caught"))
    print(f"\nsummary: {caught} of {len(results)} mutants caught", flush=True)
    by_area: dict = {}
    for mutant, verdict, _ in results:
        by_area.setdefault(mutant.area, [0, 0])
        by_area[mutant.area][0] += verdict.startswith("caught")
        by_area[mutant.area][1] += 1
    for area, (hit, total) in by_area.items():
        print(f"  {area:12s} {hit}/{total}")
    problems = [(m.name, v) for m, v, _ in results if not v.startswith("caught")]
    for name, verdict in problems:
        print(f"  {verdict}: {name}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
