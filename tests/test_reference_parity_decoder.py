"""The Decoder matches DALLE2-pytorch 1.15.6's numerically (fixtures in tests/fixtures/reference/decoder/).

Each case replays the reference's random draws on the same inputs (see tests/decoder_parity.py)
and requires every output within float32 rounding of the reference's (relative to its scale,
`allowed_ulps` in tests/decoder_parity.py): the training loss of each U-Net, the input of
every network call along DDPM / DDIM sampling chains (each the previous step's output, with the
same closed-form stand-in network on both sides), the sampled images, and inpainting with
resampling. The `unets_*` cases run our reference-architecture U-Nets end to end, loaded with the
reference's initial weights (through reference_names) or with the same synthetic weights.
Regenerate with: /work/refvenv/bin/python scripts/reference_fixtures/generate.py --only decoder
"""

import inspect
import json
import warnings

import pytest

from dalle2_decoder.models import Decoder

from .decoder_parity import FIXTURES, REAL, allowed_ulps, case_names, compare_case
from .numerics import check_error

pytestmark = pytest.mark.usefixtures("compute_threads")


@pytest.mark.parametrize("name", case_names())
def test_decoder_matches_the_reference(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scales = {}
        diffs = compare_case(name, scales)
    kinds = {kind.replace(REAL, "") for kind in diffs}
    assert "training loss" in kinds and ("sampled images" in kinds) != ("inpainted images" in kinds)
    if not name.startswith("unets_"):  # the stand-in network also records every step of the chain
        assert "DDPM step" in diffs or "DDIM step" in diffs
    assert all(scale > 1e-2 for scale in scales.values()), f"{name}: an output is ~0, its comparison vacuous: {scales}"
    problems = [
        check_error(diff, scales[kind], ulps_of_scale=allowed_ulps(kind), what=f"{name}/{kind}")
        for kind, diff in diffs.items()
    ]
    problems = [problem for problem in problems if problem]
    assert not problems, "ours differs from the reference beyond float32 rounding:\n" + "\n".join(problems)


def test_fixtures_cover_every_decoder_option_and_stay_small():
    cases = [json.loads(path.read_text()) for path in sorted(FIXTURES.glob("*.json"))]
    assert len(cases) >= 12
    assert {"init", "synthetic", "standin"} == {case["network"] for case in cases}
    used = set()
    for case in cases:
        used |= set(case["decoder"])
        used |= {"cond_scale"} & set(case["sample"])
    # Options of the reference's Decoder that change numbers (the others are compatibility-only,
    # ours and off by default, or pinned in tests/test_models_decoder.py: random_crop_sizes).
    reference_options = {
        "image_sizes",
        "timesteps",
        "sample_timesteps",
        "image_cond_drop_prob",
        "text_cond_drop_prob",
        "loss_type",
        "beta_schedule",
        "predict_x_start",
        "predict_v",
        "use_noise_for_lowres_cond",
        "use_blur_for_lowres_cond",
        "lowres_downsample_first",
        "blur_prob",
        "blur_sigma",
        "blur_kernel_size",
        "lowres_noise_sample_level",
        "learned_variance",
        "learned_variance_constrain_frac",
        "vb_loss_weight",
        "unconditional",
        "auto_normalize_img",
        "use_dynamic_thres",
        "dynamic_thres_percentile",
        "p2_loss_weight_gamma",
        "p2_loss_weight_k",
        "ddim_sampling_eta",
    }
    assert reference_options <= set(inspect.signature(Decoder).parameters)
    assert reference_options - used == set()
    size = sum(path.stat().st_size for path in FIXTURES.iterdir())
    assert size < 1.5 * 2**20, f"decoder fixtures take {size} bytes"
