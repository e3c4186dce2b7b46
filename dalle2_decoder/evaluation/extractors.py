"""Feature networks for the metrics: TorchScript files, and Inception / LPIPS weights from a local file.

Machines without network cannot download the Inception weights (torch-fidelity) nor the LPIPS
backbones (torchvision). Each metric therefore takes `weights_path`, a local copy of the file the
download would fetch, and `feature` (FID, IS, KID) or `net_type` (LPIPS) may instead name a
TorchScript file holding the user's own network. A failed download says which file to provide.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import ClassVar, Iterator, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from ..failures import EXIT_CONFIG

INCEPTION_FEATURES = (64, 192, 768, 2048, "logits_unbiased")
"""`feature` values that select torch-fidelity's Inception-v3 (the standard FID network)."""

LPIPS_NETS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
"""`net_type` values of torchmetrics' LPIPS, and the torchvision weights each backbone downloads."""


class EvaluationSetupError(ValueError):
    """A metric cannot be built as configured (missing weights, unreadable network, bad option)."""

    exit_status: ClassVar[int] = EXIT_CONFIG


def inception_weights_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def lpips_backbone_url(net_type: str) -> str:
    import torchvision.models

    return getattr(torchvision.models, LPIPS_NETS[net_type]).DEFAULT.url


def file_name(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def hub_checkpoint_dir() -> Path:
    """Where torch.hub (used by torch-fidelity and torchvision) caches downloads: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def download_error(where: str, what: str, url: str, error: BaseException) -> EvaluationSetupError:
    """The error for a download that failed: which file to provide and where to put it."""
    name = file_name(url)
    return EvaluationSetupError(
        f"{where}: the {what} weights could not be downloaded ({type(error).__name__}: {error}). "
        f"Without network, fetch {name} from {url} on another machine and set {where}.weights_path to "
        f"that file, or put it in {hub_checkpoint_dir()} (the torch.hub cache; set TORCH_HOME to move it)"
    )


def check_weights_file(where: str, path: str) -> Path:
    """`weights_path` must exist and hold plain tensors (never unpickle arbitrary objects)."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise EvaluationSetupError(f"{where}.weights_path: file not found: {resolved}")
    try:
        state = torch.load(resolved, map_location="cpu", weights_only=True)
    except Exception as error:
        raise EvaluationSetupError(
            f"{where}.weights_path: {resolved} is not a weights-only state dict ({error})"
        ) from error
    if not isinstance(state, dict):
        raise EvaluationSetupError(f"{where}.weights_path: {resolved} holds a {type(state).__name__}, not a state dict")
    return resolved.resolve()


@contextlib.contextmanager
def temporary_hub_dir() -> Iterator[Path]:
    """A new empty torch.hub cache directory for the block; after it, the hub directory is exactly
    what it was (following $TORCH_HOME if it did) and the new one is deleted.

    torch.hub has no public way to undo `torch.hub.set_dir`: once called, the hub directory no
    longer follows $TORCH_HOME. So while it follows $TORCH_HOME (nobody called set_dir), the block
    moves $TORCH_HOME and puts it back; only when set_dir was called before (the hub directory is
    not where the moved $TORCH_HOME says) is set_dir used, and undone by setting the old directory.
    Relies on get_dir() reading $TORCH_HOME at each call until set_dir is called;
    tests/test_evaluation_weights.py checks both cases, so a torch that changes this fails there.
    """
    previous_home = os.environ.get("TORCH_HOME")
    previous_hub = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="dalle2-eval-torch-home-") as home:
        hub = Path(home) / "hub"
        hub.mkdir()
        os.environ["TORCH_HOME"] = home
        follows_home = Path(torch.hub.get_dir()) == hub
        try:
            if not follows_home:
                _set_env("TORCH_HOME", previous_home)
                torch.hub.set_dir(str(hub))
            yield hub
        finally:
            if follows_home:
                _set_env("TORCH_HOME", previous_home)
            else:
                torch.hub.set_dir(previous_hub)


def _set_env(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def hub_cache_holding(path: Path, name: str) -> Iterator[None]:
    """A throw-away torch.hub cache in which `name` is `path`, so a library that downloads finds it there."""
    with temporary_hub_dir() as hub:
        checkpoints = hub / "checkpoints"
        checkpoints.mkdir()
        try:
            (checkpoints / name).symlink_to(path)
        except OSError:  # no symlinks on this filesystem
            import shutil

            shutil.copyfile(path, checkpoints / name)
        yield


def load_torchscript(where: str, path: str, device: torch.device) -> nn.Module:
    """A user's network file: TorchScript (`torch.jit.save`), or a `torch.export` program (`.pt2`)."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise EvaluationSetupError(f"{where}: {resolved} does not exist (expected a TorchScript or .pt2 file)")
    try:
        if resolved.suffix == ".pt2":
            return torch.export.load(str(resolved)).module().to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, not gone
            return torch.jit.load(str(resolved), map_location=device).eval()
    except Exception as error:
        raise EvaluationSetupError(
            f"{where}: {resolved} is not a TorchScript file torch.jit.load can read, nor a torch.export .pt2 ({error})"
        ) from error


class ScriptedFeatures(nn.Module):
    """A user's TorchScript feature network as a torchmetrics `feature` module.

    The metrics always receive uint8 images (0..255); the network gets them as they are, or as
    floats in [0, 1] when the metric's `normalize` is true. Outputs are flattened to (N, D).
    """

    def __init__(self, network: nn.Module, *, takes_float: bool, probe_size: int, device: torch.device):
        super().__init__()
        self.network = network
        self.takes_float = takes_float
        with torch.no_grad():
            probe = self(torch.zeros(2, 3, probe_size, probe_size, dtype=torch.uint8, device=device))
        self.num_features = int(probe.shape[1])  # read by torchmetrics' FID instead of its own probe

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.takes_float and images.dtype == torch.uint8:
            images = images.float() / 255.0
        features = self.network(images)
        return features.reshape(features.shape[0], -1)


def inception_from_file(where: str, weights: Path, feature, antialias: bool) -> nn.Module:
    """torchmetrics' Inception wrapper with the weights read from a local file instead of downloaded."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        return NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(feature)],
            feature_extractor_weights_path=str(weights),
            antialias=antialias,
        )
    except Exception as error:
        raise EvaluationSetupError(
            f"{where}.weights_path: {weights} does not load into torch-fidelity's Inception-v3 "
            f"(expected the contents of {file_name(inception_weights_url())}): {error}"
        ) from error


def default_hub_file(url: str) -> Optional[Path]:
    """The cached copy of `url` in the torch.hub cache, when there is one."""
    cached = hub_checkpoint_dir() / file_name(url)
    return cached if cached.is_file() else None
