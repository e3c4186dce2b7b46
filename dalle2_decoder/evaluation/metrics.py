"""The configured torchmetrics metrics, fed real/generated pairs on every rank and computed once on the pooled set.

Each rank updates its metrics with its own samples. At `compute` every metric's state is
synchronised over all ranks (torchmetrics' gather, when torch.distributed is initialised), so the
value is that of the pooled samples, never an average of per-rank values. To make the value
independent of how samples were spread over ranks, pooled per-sample features are put in a
canonical order and the random draws (IS splits, KID subsets) use a fixed seed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from . import extractors as ex
from .extractors import EvaluationSetupError
from .fidelity import PAIRED_KEYS, clip_similarity, paired_errors

DEFAULT_FEATURE = {"FID": 2048, "IS": "logits_unbiased", "KID": 2048}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to 0..255 bytes, rounded as when saved to PNG."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def canonical_order(values: torch.Tensor) -> torch.Tensor:
    """Rows sorted by a fixed random projection: the same order whichever rank held which row."""
    if values.dim() < 2:
        return values.sort().values
    flat = values.reshape(values.shape[0], -1).double()
    direction = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return values[torch.argsort(flat @ direction.to(flat.device), stable=True)]


class ScriptedLPIPS(Metric):
    """LPIPS with a user's TorchScript backbone (`LPIPS.net_type` naming a file).

    The network maps images in [-1, 1] (N, 3, H, W) to a list of feature maps (N, C_l, H_l, W_l).
    Distance, as in Zhang et al. 2018 eq. 1 with every channel weight 1 (their "lin: false"
    baseline): sum over layers of the spatial mean of the squared difference of channel-unit-normalised features.
    """

    full_state_update = False

    def __init__(self, network: nn.Module, reduction: str = "mean", normalize: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.network = network
        self.reduction = reduction
        self.normalize = normalize
        self.add_state("score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return features / torch.sqrt((features**2).sum(dim=1, keepdim=True) + eps)

    def distances(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        if self.normalize:  # inputs in [0, 1]
            image1, image2 = image1 * 2 - 1, image2 * 2 - 1
        total = torch.zeros(image1.shape[0], dtype=torch.float64, device=image1.device)
        for f1, f2 in zip(self.network(image1), self.network(image2)):
            total += ((self._unit(f1) - self._unit(f2)) ** 2).sum(dim=1).mean(dim=(1, 2)).double()
        return total

    def update(self, image1: torch.Tensor, image2: torch.Tensor) -> None:
        scores = self.distances(image1, image2)
        self.score_sum += scores.sum()
        self.count += scores.numel()

    def compute(self) -> torch.Tensor:
        return self.score_sum if self.reduction == "sum" else self.score_sum / self.count.clamp(min=1)


class FidelityScores(Metric):
    """The fidelity measures of `fidelity.py` averaged over every sample seen: per-sample values
    summed (float64) with their counts, so the pooled value is exactly the mean over all ranks'
    samples. CLIP similarity only with a `clip` and the conditioning embeddings."""

    full_state_update = False

    def __init__(self, clip=None, coarse_size: int = 8, **kwargs: Any):
        super().__init__(**kwargs)
        self.clip = clip
        self.coarse_size = coarse_size
        for key in (*PAIRED_KEYS, "clip_similarity"):
            self.add_state(f"{key}_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("clip_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, real: torch.Tensor, generated: torch.Tensor, image_embed: Optional[torch.Tensor] = None) -> None:
        errors = paired_errors(generated, real, self.coarse_size)
        for key in PAIRED_KEYS:
            setattr(self, f"{key}_sum", getattr(self, f"{key}_sum") + errors[key].double().sum())
        self.count += generated.shape[0]
        if self.clip is not None and image_embed is not None:
            self.clip_similarity_sum += clip_similarity(self.clip, generated, image_embed).double().sum()
            self.clip_count += generated.shape[0]

    def compute(self) -> Dict[str, torch.Tensor]:
        values = {key: getattr(self, f"{key}_sum") / self.count.clamp(min=1) for key in PAIRED_KEYS}
        if self.clip_count > 0:
            values["clip_similarity"] = self.clip_similarity_sum / self.clip_count
        return values


def _weights_option(where: str, options: Dict[str, Any]) -> Optional[str]:
    path = options.pop("weights_path", None)
    native = options.pop("feature_extractor_weights_path", None)  # FID's own name for the same thing
    if path is not None and native is not None and path != native:
        raise EvaluationSetupError(
            f"{where}: weights_path and feature_extractor_weights_path name different files; give one"
        )
    return path if path is not None else native


def _construct(where: str, cls, options: Dict[str, Any]) -> Metric:
    try:
        # Synchronised explicitly in `MetricSuite.compute`, and never cached: a cached value would be
        # the pooled one, returned again for the rank's own state once that is restored.
        return cls(**options, sync_on_compute=False, compute_with_cache=False)
    except EvaluationSetupError:
        raise
    except (ValueError, TypeError) as error:
        raise EvaluationSetupError(f"{where}: {error}") from error


def _with_download(where: str, what: str, url: str, build: Callable[[], Metric]) -> Metric:
    """Build a metric whose constructor may download `url`, turning a failed download into a clear error."""
    try:
        return build()
    except EvaluationSetupError:
        raise
    except Exception as error:  # urllib, http and hash errors from torch.hub
        if ex.default_hub_file(url) is not None:
            raise  # the file was there: the failure is something else
        raise ex.download_error(where, what, url, error) from error


def build_inception_metric(name: str, options: Mapping[str, Any], *, device: torch.device, image_size: int) -> Metric:
    """FID, IS or KID: torch-fidelity's Inception (downloaded or `weights_path`) or a TorchScript `feature`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    cls = {"FID": FrechetInceptionDistance, "IS": InceptionScore, "KID": KernelInceptionDistance}[name]
    where = f"evaluate.{name}"
    options = dict(options)
    weights = _weights_option(where, options)
    # We always feed uint8 images; `normalize` says whether a TorchScript network wants floats in [0, 1].
    takes_float = bool(options.pop("normalize", False))
    options["normalize"] = False
    if isinstance(options.get("input_img_size"), list):
        options["input_img_size"] = tuple(options["input_img_size"])
    feature = options.get("feature", DEFAULT_FEATURE[name])
    if isinstance(feature, str) and feature not in ex.INCEPTION_FEATURES:
        if weights is not None:
            raise EvaluationSetupError(
                f"{where}.weights_path: only for the Inception network; {feature} is a TorchScript file"
            )
        network = ex.load_torchscript(f"{where}.feature", feature, device)
        try:
            options["feature"] = ex.ScriptedFeatures(
                network, takes_float=takes_float, probe_size=image_size, device=device
            )
        except Exception as error:
            given = (
                "floats in [0, 1]"
                if takes_float
                else "uint8 images (set normalize to true to give it floats in [0, 1])"
            )
            raise EvaluationSetupError(
                f"{where}.feature: {feature} fails on a batch of {image_size}px {given}: {error}"
            ) from error
        return _construct(where, cls, options)
    if feature not in ex.INCEPTION_FEATURES:
        raise EvaluationSetupError(
            f"{where}.feature: {feature!r} is neither an Inception feature {list(ex.INCEPTION_FEATURES)} "
            "nor a TorchScript file path"
        )
    if weights is not None:
        path = ex.check_weights_file(where, weights)
        options["feature"] = ex.inception_from_file(where, path, feature, antialias=options.get("antialias", True))
        return _construct(where, cls, options)
    return _with_download(where, "Inception-v3", ex.inception_weights_url(), lambda: _construct(where, cls, options))


def build_lpips_metric(options: Mapping[str, Any], *, device: torch.device) -> Metric:
    """torchmetrics' LPIPS (alex/vgg/squeeze; backbone downloaded or `weights_path`) or `ScriptedLPIPS`."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    where = "evaluate.LPIPS"
    options = dict(options)
    weights = _weights_option(where, options)
    if options.get("reduction", "mean") not in ("mean", "sum"):
        raise EvaluationSetupError(
            f'{where}.reduction: must be "mean" or "sum" (one number is logged), not {options["reduction"]!r}'
        )
    net_type = options.get("net_type", "alex")
    if net_type not in ex.LPIPS_NETS:
        if weights is not None:
            raise EvaluationSetupError(
                f"{where}.weights_path: only for the alex/vgg/squeeze backbones; {net_type} is a TorchScript file"
            )
        network = ex.load_torchscript(f"{where}.net_type", net_type, device)
        return ScriptedLPIPS(
            network,
            reduction=options.get("reduction", "mean"),
            normalize=bool(options.get("normalize", False)),
            sync_on_compute=False,
            compute_with_cache=False,
        )
    url = ex.lpips_backbone_url(net_type)
    if weights is not None:
        path = ex.check_weights_file(where, weights)
        try:
            with ex.hub_cache_holding(path, ex.file_name(url)):
                return _construct(where, LearnedPerceptualImagePatchSimilarity, options)
        except EvaluationSetupError:
            raise
        except Exception as error:
            raise EvaluationSetupError(
                f"{where}.weights_path: {path} does not load into torchvision's {net_type} backbone "
                f"(expected the contents of {ex.file_name(url)}): {error}"
            ) from error
    return _with_download(
        where,
        f"LPIPS {net_type} backbone",
        url,
        lambda: _construct(where, LearnedPerceptualImagePatchSimilarity, options),
    )


class MetricSuite:
    """The enabled metrics (`EvaluateConfig.metrics()`), on `device`, for images of `image_size` pixels;
    with `fidelity`, also the fidelity scores (`FidelityScores`: CLIP similarity with `clip`, paired
    errors at `coarse_size`)."""

    def __init__(
        self,
        metrics: Mapping[str, Mapping[str, Any]],
        *,
        device: torch.device,
        image_size: int,
        fidelity: bool = False,
        clip=None,
        coarse_size: int = 8,
    ):
        self.metrics: Dict[str, Metric] = {}
        self.lpips_normalize = True
        for name, options in metrics.items():
            if name == "LPIPS":
                metric = build_lpips_metric(options, device=device)
                self.lpips_normalize = bool(options.get("normalize", False))
            else:
                metric = build_inception_metric(name, options, device=device, image_size=image_size)
            self.metrics[name] = metric.to(device)
        if fidelity:
            self.metrics["fidelity"] = FidelityScores(
                clip, coarse_size, sync_on_compute=False, compute_with_cache=False
            ).to(device)
        self.notes: List[str] = []

    def __bool__(self) -> bool:
        return bool(self.metrics)

    @torch.no_grad()
    def update(self, real: torch.Tensor, generated: torch.Tensor, image_embed: Optional[torch.Tensor] = None) -> None:
        """One batch: real images and those generated from their embeddings, both (B, 3, S, S) in [0, 1],
        and those image embeddings (B, D) for CLIP similarity."""
        real8, generated8 = to_uint8(real), to_uint8(generated)
        for name, metric in self.metrics.items():
            if name == "fidelity":  # the same 8-bit pixels as the other metrics
                metric.update(real8.float() / 255, generated8.float() / 255, image_embed)
            elif name in ("FID", "KID"):
                metric.update(real8, real=True)
                metric.update(generated8, real=False)
            elif name == "IS":
                metric.update(generated8)
            else:  # LPIPS: each real image against its reconstruction, on the same 8-bit images
                real_f, generated_f = real8.float() / 255, generated8.float() / 255
                if not self.lpips_normalize:
                    real_f, generated_f = real_f * 2 - 1, generated_f * 2 - 1
                metric.update(real_f, generated_f)

    def compute(self, *, seed: int = 0) -> Dict[str, float]:
        """Every metric over the samples of all ranks; every rank must call it (it gathers)."""
        values: Dict[str, float] = {}
        self.notes = []
        for name, metric in self.metrics.items():
            result = _pooled_compute(metric, seed, self.notes, name)
            if isinstance(result, dict):
                values.update({f"eval/{key}": float(value) for key, value in result.items()})
            elif isinstance(result, tuple):
                values[f"eval/{name}_mean"], values[f"eval/{name}_std"] = (float(r) for r in result)
            else:
                values[f"eval/{name}"] = float(result)
        return values

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


def _pooled_compute(metric: Metric, seed: int, notes: List[str], name: str):
    # One tensor per list state on every rank: the gather then runs the same collectives on every
    # rank, however many batches each one saw.
    list_states = [state for state, value in metric.metric_state.items() if isinstance(value, list)]
    for state in list_states:
        value = getattr(metric, state)
        if len(value) != 1:
            setattr(metric, state, [dim_zero_cat(value)])
    with metric.sync_context(should_unsync=True):
        for state in list_states:
            setattr(metric, state, [canonical_order(dim_zero_cat(getattr(metric, state)))])
        if name == "KID":
            smallest = min(metric.real_features[0].shape[0], metric.fake_features[0].shape[0])
            if smallest < metric.subset_size:
                notes.append(
                    f"evaluate.KID: subset_size {metric.subset_size} is more than the {smallest} samples; "
                    f"using {smallest}"
                )
                configured, metric.subset_size = metric.subset_size, smallest
            else:
                configured = metric.subset_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                result = metric.compute()
            finally:
                if name == "KID":
                    metric.subset_size = configured
    return result


def pooled_count(count: int, accelerator) -> int:
    """Samples over all ranks (a collective: every rank calls it)."""
    if accelerator is None or accelerator.num_processes == 1:
        return count
    total = accelerator.reduce(torch.tensor(count, device=accelerator.device), reduction="sum")
    return int(total.item())


def samples_per_rank(n_samples: int, world_size: int, rank: Optional[int] = None) -> int:
    """The samples rank `rank` evaluates: n // ranks, one more on the first n % ranks ranks, so the
    shares add up to exactly `n_samples`. Without `rank`: the largest share, ceil(n / ranks)."""
    if rank is not None:
        return n_samples // world_size + (1 if rank < n_samples % world_size else 0)
    return math.ceil(n_samples / world_size)
