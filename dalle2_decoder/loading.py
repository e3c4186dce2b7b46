"""One-line loading of a trained decoder: `load_decoder(path_or_url_or_hub_id)`; and of saved weights
into a model you built: `load_model_weights(model, path)`.

The source may be
- a local file written by training: a model save (`.safetensors` or `.pt`) or a checkpoint
  (`.pt` / `.pth`; its EMA weights are used unless `use_ema=False`);
- a local folder holding a hub-style `config.json` (e.g. a downloaded hub repository);
- an `http://` / `https://` URL of such a file (downloaded once into `cache_dir`);
- a Hugging Face Hub repository id (`user/name`) written by the huggingface saver, whose
  `config.json` names the weights file.

The decoder's configuration comes from the file's own metadata (every file training writes
carries the run's config), so nothing but the source is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Union

import torch

from .failures import EXIT_CHECKPOINT
from .tracking.model_weights import load_model_weights as load_model_weights  # offered here beside load_decoder

HUB_CONFIG = "config.json"
HUB_FORMAT = "dalle2_decoder.hub/1"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DecoderLoadError(RuntimeError):
    """The source cannot be found, fetched or turned into a decoder; the message says which and why."""

    exit_status: ClassVar[int] = EXIT_CHECKPOINT


@dataclass
class LoadedDecoder:
    """A ready decoder and what it was made from."""

    decoder: Any
    """The `Decoder`, in eval mode, with EMA weights where the file has them."""
    config: Dict[str, Any]
    """The run configuration recorded in the file (secrets masked), as JSON data."""
    step: int
    """The training step (samples seen) the weights were saved at."""
    source: str
    """Where the weights came from (path, URL or hub repo and file)."""
    weights: str
    """`ema` or `trained` (a checkpoint without EMA, or use_ema=False), or `model` (a model save)."""


def default_cache_dir() -> Path:
    root = os.environ.get("DALLE2_DECODER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dalle2_decoder"
    )
    return Path(root)


def _download_url(url: str, cache_dir: Path) -> Path:
    from .config.tracker import UrlLoadConfig
    from .tracking.loaders import LoadError, UrlLoader

    # One folder per URL, so two files with the same name from different places do not collide.
    folder = cache_dir / "urls" / hashlib.sha256(url.encode()).hexdigest()[:16]
    name = Path(urllib.parse.urlparse(url).path).name or "checkpoint.pt"
    if (folder / name).is_file():
        return folder / name
    try:
        return UrlLoader(UrlLoadConfig(load_from="url", url=url), folder).fetch()
    except LoadError as error:
        raise DecoderLoadError(str(error).replace(" (check tracker.load.url)", "")) from error


def _hub_download(repo_id: str, filename: str, *, revision, endpoint, token, cache_dir) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                endpoint=endpoint,
                token=token,
                cache_dir=None if cache_dir is None else str(Path(cache_dir) / "hub"),
            )
        )
    except EntryNotFoundError as error:
        raise DecoderLoadError(f"hub repo {repo_id} has no file {filename}") from error
    except RepositoryNotFoundError as error:
        raise DecoderLoadError(f"hub repo {repo_id} not found (or not accessible with the token given)") from error
    except (HfHubHTTPError, OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DecoderLoadError(f"could not download {filename} from hub repo {repo_id}: {first}") from error


def _read_hub_config(path: Path, where: str) -> Dict[str, Any]:
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DecoderLoadError(f"{where}: {HUB_CONFIG} is not readable JSON ({error})") from error
    if not isinstance(card, dict) or card.get("format") != HUB_FORMAT or not isinstance(card.get("weights"), str):
        raise DecoderLoadError(
            f"{where}: {HUB_CONFIG} was not written by dalle2_decoder (no 'format' {HUB_FORMAT!r} "
            "with a 'weights' file name)"
        )
    return card


def resolve_source(
    source: Union[str, "os.PathLike[str]"],
    *,
    filename: Optional[str] = None,
    revision: Optional[str] = None,
    endpoint: Optional[str] = None,
    token: Optional[str] = None,
    cache_dir: Union[None, str, "os.PathLike[str]"] = None,
) -> tuple[Path, str]:
    """(local weights file, description of where it came from) for any source `load_decoder` accepts."""
    text = os.fspath(source)
    local = Path(text).expanduser()
    if local.is_file():
        return local, str(local)
    from .tracking.sharded import is_sharded_folder

    if is_sharded_folder(local):  # a sharded run's checkpoint: its shards are read whole
        return local, str(local)
    if local.is_dir():
        card_path = local / HUB_CONFIG
        if filename is None and not card_path.is_file():
            raise DecoderLoadError(f"{local} is a folder without {HUB_CONFIG}; give the weights file itself")
        name = filename or _read_hub_config(card_path, str(local))["weights"]
        weights = local / name
        if not weights.is_file():
            raise DecoderLoadError(f"{local}: weights file {name} not found")
        return weights, str(weights)
    scheme = urllib.parse.urlparse(text).scheme
    if scheme in ("http", "https"):
        from .tracking.redact import redact_string

        return _download_url(text, Path(cache_dir) if cache_dir else default_cache_dir()), redact_string(text)
    # A name ending like a weights file is a path that does not exist, not a hub repo.
    looks_like_file = text.endswith((".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".json"))
    if _HUB_ID.match(text) and not looks_like_file:
        options = dict(revision=revision, endpoint=endpoint, token=token, cache_dir=cache_dir)
        if filename is None:
            card = _read_hub_config(_hub_download(text, HUB_CONFIG, **options), f"hub repo {text}")
            filename = card["weights"]
        return _hub_download(text, filename, **options), f"hub repo {text} ({filename})"
    raise DecoderLoadError(f"{text}: no such file or folder, and not an http(s) URL or a hub repo id (user/name)")


def _decoder_config(loaded, where: str):
    from .config.decoder import DecoderConfig
    from .config.structure import structure_at
    from .tracking.reference import recorded_config

    if not loaded.config_json:
        raise DecoderLoadError(
            f"{where} records no configuration (a plain state dict, or a DALLE2-pytorch file written before 1.0); "
            "load it with load_model_weights into TrainDecoderConfig.from_json_path(cfg).decoder.create() instead"
        )
    try:
        raw = recorded_config(loaded)  # a DALLE2-pytorch file's: its release's U-Nets, unset options left out
    except ValueError as error:
        raise DecoderLoadError(f"{where}: the configuration in its metadata is not JSON ({error})") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("decoder"), dict):
        raise DecoderLoadError(f"{where}: the configuration in its metadata has no decoder section")
    # The decoder section alone: data paths and tracker settings of the training run do not matter here.
    decoder_config, problems = structure_at(raw["decoder"], DecoderConfig, "decoder")
    if decoder_config is not None:
        problems += decoder_config.check(None)
    if problems:
        raise DecoderLoadError(f"{where}: its decoder configuration does not load:\n  " + "\n  ".join(problems))
    return raw, decoder_config


def load(
    source: Union[str, "os.PathLike[str]"],
    *,
    use_ema: bool = True,
    device: Union[str, torch.device] = "cpu",
    filename: Optional[str] = None,
    revision: Optional[str] = None,
    endpoint: Optional[str] = None,
    token: Optional[str] = None,
    cache_dir: Union[None, str, "os.PathLike[str]"] = None,
) -> LoadedDecoder:
    """`load_decoder`, also returning the configuration and step recorded with the weights."""
    from .tracking import CheckpointError, load_state_dict_checked, read_file
    from .training.state import checkpoint_weights, has_ema_weights

    path, where = resolve_source(
        source, filename=filename, revision=revision, endpoint=endpoint, token=token, cache_dir=cache_dir
    )
    try:
        loaded = read_file(path)
    except CheckpointError as error:
        raise DecoderLoadError(str(error)) from error
    raw, decoder_config = _decoder_config(loaded, where)
    decoder = decoder_config.create()
    try:
        if loaded.kind == "model":
            load_state_dict_checked(decoder, loaded.model_state, source=where)
            kind = "model"
        else:
            # The checkpoint's weights with each U-Net's EMA average where it has one (one rule, training.state).
            load_state_dict_checked(decoder, checkpoint_weights(loaded, use_ema=use_ema), source=where)
            kind = "ema" if use_ema and has_ema_weights(loaded) else "trained"
    except CheckpointError as error:
        raise DecoderLoadError(str(error)) from error
    decoder.to(device).eval().requires_grad_(False)
    return LoadedDecoder(decoder, raw, loaded.step, where, kind)


def load_decoder(source: Union[str, "os.PathLike[str]"], **options: Any):
    """A ready `Decoder` (eval mode, EMA weights) from a file, a folder, a URL or a hub repo id.

    `options` are `load`'s: use_ema (False: a checkpoint's trained weights), device; filename /
    revision: for a hub repo or folder, a weights file other than the one its config.json names, and
    the hub revision; endpoint / token: a self-hosted hub and its token (default: the hub client's,
    e.g. HF_ENDPOINT / HF_TOKEN); cache_dir: where URL downloads (and hub files) are kept.
    Raises `DecoderLoadError` with one clear message when the source cannot be used.
    """
    return load(source, **options).decoder
