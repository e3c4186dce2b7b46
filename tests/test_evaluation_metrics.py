"""Each metric on small images with tiny TorchScript networks, against an independent computation."""

import numpy as np
import pytest
import torch

from dalle2_decoder.evaluation import EvaluationSetupError, MetricSuite, canonical_order

from .evaluation_fixtures import (
    CLASSES,
    IMAGE_SIZE,
    METRIC_ULPS,
    assert_metrics_close,
    fixed_images,
    metric_options,
    metric_scales,
    trace_sqrt_product,
    write_networks,
)
from .numerics import assert_close_to_scale

COUNT = 24


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    return write_networks(tmp_path_factory.mktemp("networks"))


@pytest.fixture(scope="module")
def images():
    return fixed_images(COUNT)


def quantised(images):
    """What the metrics see: 8-bit images, as floats in [0, 1]."""
    return (images.clamp(0, 1) * 255).round() / 255


def features(path, images):
    network = torch.jit.load(path)
    with torch.no_grad():
        return network(quantised(images)).double().numpy()


def suite_values(options, real, generated, batch=5, seed=0):
    suite = MetricSuite(options, device=torch.device("cpu"), image_size=IMAGE_SIZE)
    for start in range(0, real.shape[0], batch):
        suite.update(real[start : start + batch], generated[start : start + batch])
    return suite.compute(seed=seed), suite


def test_fid_matches_means_and_covariances_in_numpy(networks, images):
    real, generated = images
    values, _ = suite_values({"FID": metric_options(networks)["FID"]}, real, generated)
    f_real, f_fake = features(networks["features"], real), features(networks["features"], generated)
    mu1, mu2 = f_real.mean(0), f_fake.mean(0)
    s1, s2 = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * trace_sqrt_product(s1, s2)
    assert expected > 1e-3  # the two sets differ
    scale = metric_scales(networks, real, generated)["eval/FID"]
    assert_close_to_scale(values["eval/FID"], expected, ulps_of_scale=METRIC_ULPS, scale=scale, what="FID")
    assert set(values) == {"eval/FID"}


def polynomial_mmd(x, y, degree=3, coef=1.0):
    gamma = 1.0 / x.shape[1]
    kxx, kyy, kxy = ((gamma * a @ b.T + coef) ** degree for a, b in ((x, x), (y, y), (x, y)))
    m = x.shape[0]
    return (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()


def test_kid_matches_an_independent_polynomial_kernel_mmd(networks, images):
    real, generated = images
    # Subsets as large as the sample set are the whole set in another order: the MMD of the whole set.
    options = {"KID": {**metric_options(networks)["KID"], "subset_size": COUNT, "subsets": 3}}
    values, _ = suite_values(options, real, generated)
    expected = polynomial_mmd(features(networks["features"], real), features(networks["features"], generated))
    # (KID is ~1e-3 of the kernel means it is the difference of: bounds relative to those)
    scale = metric_scales(networks, real, generated)["eval/KID_mean"]
    assert_close_to_scale(values["eval/KID_mean"], expected, ulps_of_scale=METRIC_ULPS, scale=scale, what="KID")
    assert_close_to_scale(values["eval/KID_std"], 0.0, ulps_of_scale=METRIC_ULPS, scale=scale, what="KID_std")


def test_kid_subset_size_larger_than_the_samples_uses_them_all(networks, images):
    real, generated = images
    options = {"KID": {**metric_options(networks)["KID"], "subset_size": 1000}}
    values, suite = suite_values(options, real, generated)
    expected = polynomial_mmd(features(networks["features"], real), features(networks["features"], generated))
    scale = metric_scales(networks, real, generated)["eval/KID_mean"]
    assert_close_to_scale(values["eval/KID_mean"], expected, ulps_of_scale=METRIC_ULPS, scale=scale, what="KID")
    assert any("subset_size 1000" in note for note in suite.notes)


def inception_score(logits):
    p = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
    marginal = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))


def test_inception_score_is_exp_of_the_mean_kl_to_the_marginal(networks, images):
    _, generated = images
    logits = features(networks["logits"], generated)
    values, _ = suite_values({"IS": {**metric_options(networks)["IS"], "splits": 1}}, generated, generated)
    assert values["eval/IS_mean"] == pytest.approx(inception_score(logits), rel=1e-4)
    assert 1.0 < values["eval/IS_mean"] <= CLASSES

    # Splits: the pooled samples in their canonical order, shuffled with the evaluation seed, cut in 3.
    seed = 7
    values, _ = suite_values({"IS": {**metric_options(networks)["IS"], "splits": 3}}, generated, generated, seed=seed)
    ordered = canonical_order(torch.as_tensor(logits).float()).double()
    torch.manual_seed(seed)
    parts = ordered[torch.randperm(COUNT)].chunk(3)
    scores = np.array([inception_score(part.numpy()) for part in parts])
    assert values["eval/IS_mean"] == pytest.approx(scores.mean(), rel=1e-4)
    assert values["eval/IS_std"] == pytest.approx(scores.std(ddof=1), rel=1e-3)


def test_lpips_with_a_torchscript_network_matches_an_independent_computation(networks, images):
    real, generated = images
    values, _ = suite_values({"LPIPS": metric_options(networks)["LPIPS"]}, real, generated)
    network = torch.jit.load(networks["lpips"])
    with torch.no_grad():
        maps1 = [m.double().numpy() for m in network(quantised(real) * 2 - 1)]
        maps2 = [m.double().numpy() for m in network(quantised(generated) * 2 - 1)]
    per_image = np.zeros(COUNT)
    for a, b in zip(maps1, maps2):
        a = a / np.sqrt((a**2).sum(1, keepdims=True) + 1e-10)
        b = b / np.sqrt((b**2).sum(1, keepdims=True) + 1e-10)
        per_image += ((a - b) ** 2).sum(1).mean((1, 2))
    assert values["eval/LPIPS"] == pytest.approx(per_image.mean(), rel=1e-4)
    # The same images are at distance 0; `sum` adds the per-image distances.
    assert suite_values({"LPIPS": metric_options(networks)["LPIPS"]}, real, real)[0]["eval/LPIPS"] == pytest.approx(
        0, abs=1e-9
    )
    summed = suite_values({"LPIPS": {**metric_options(networks)["LPIPS"], "reduction": "sum"}}, real, generated)[0]
    assert summed["eval/LPIPS"] == pytest.approx(per_image.sum(), rel=1e-4)


def test_all_metrics_together_do_not_depend_on_batching(networks, images):
    real, generated = images
    options = metric_options(networks)
    one, _ = suite_values(options, real, generated, batch=COUNT, seed=4)
    many, _ = suite_values(options, real, generated, batch=5, seed=4)
    assert set(one) == {"eval/FID", "eval/IS_mean", "eval/IS_std", "eval/KID_mean", "eval/KID_std", "eval/LPIPS"}
    assert_metrics_close(many, one, metric_scales(networks, real, generated))


def test_bad_metric_options_are_setup_errors_naming_the_option(networks, tmp_path):
    device = torch.device("cpu")
    with pytest.raises(EvaluationSetupError, match=r"evaluate\.FID\.feature: .*missing\.pt does not exist"):
        MetricSuite({"FID": {"feature": str(tmp_path / "missing.pt")}}, device=device, image_size=IMAGE_SIZE)
    not_script = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(1)}, not_script)
    with pytest.raises(EvaluationSetupError, match=r"evaluate\.IS\.feature: .*not a TorchScript file"):
        MetricSuite({"IS": {"feature": str(not_script)}}, device=device, image_size=IMAGE_SIZE)
    with pytest.raises(EvaluationSetupError, match=r"evaluate\.KID\.feature: 1000 is neither an Inception feature"):
        MetricSuite({"KID": {"feature": 1000}}, device=device, image_size=IMAGE_SIZE)
    with pytest.raises(
        EvaluationSetupError,
        match=r"evaluate\.KID\.feature: .*features\.pt fails on a batch of 16px uint8 images \(set normalize",
    ):
        MetricSuite({"KID": {"feature": networks["features"]}}, device=device, image_size=IMAGE_SIZE)
    with pytest.raises(EvaluationSetupError, match=r"evaluate\.KID: Argument `subsets`"):
        MetricSuite(
            {"KID": {"feature": networks["features"], "normalize": True, "subsets": 0}},
            device=device,
            image_size=IMAGE_SIZE,
        )
    with pytest.raises(EvaluationSetupError, match=r"evaluate\.LPIPS\.reduction"):
        MetricSuite(
            {"LPIPS": {"net_type": networks["lpips"], "reduction": "none"}}, device=device, image_size=IMAGE_SIZE
        )


def test_unknown_metric_keys_are_config_errors(config_problems, minimal_config, networks):
    minimal_config["evaluate"] = {
        "FID": {"feature": networks["features"], "normalise": True},
        "LPIPS": {"weights_path": "x"},
    }
    problems = config_problems(minimal_config)
    assert problems == ["evaluate.FID.normalise: unknown option (did you mean normalize?)"]


def test_a_torch_export_program_works_like_the_torchscript_file(tmp_path, images):
    from .evaluation_fixtures import FEATURE_DIM, TinyFeatures

    torch.manual_seed(0)
    network = TinyFeatures(FEATURE_DIM).eval()
    program = torch.export.export(
        network, (torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, str(tmp_path / "features.pt2"))
    torch.jit.script(network).save(str(tmp_path / "features.pt"))
    real, generated = images
    exported, _ = suite_values({"FID": {"feature": str(tmp_path / "features.pt2"), "normalize": True}}, real, generated)
    scripted, _ = suite_values({"FID": {"feature": str(tmp_path / "features.pt"), "normalize": True}}, real, generated)
    assert exported["eval/FID"] == pytest.approx(scripted["eval/FID"], rel=1e-6) and exported["eval/FID"] > 0


def test_computing_again_with_another_seed_computes_again(networks, images):
    """No value is served from torchmetrics' compute cache: the same samples computed with another
    seed give that seed's KID subsets (a cached value would repeat the first seed's)."""
    real, generated = images
    options = {"KID": {**metric_options(networks)["KID"], "subset_size": 10, "subsets": 3}}
    first, suite = suite_values(options, real, generated, seed=1)
    again = suite.compute(seed=2)
    assert again["eval/KID_mean"] != first["eval/KID_mean"]
    assert again == suite_values(options, real, generated, seed=2)[0]
    assert suite.compute(seed=1) == first
