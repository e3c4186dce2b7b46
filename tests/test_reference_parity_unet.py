"""Our Unet against DALLE2-pytorch 1.15.6 on the fixtures of scripts/reference_fixtures/unet_cases.py.

Each case (every reference Unet option non-default somewhere) loads the reference's weights into
our Unet through reference_names and must reproduce every recorded output (conditioning kept,
dropped, image-only dropped, text-only dropped, guided with cond_scale 3) within float32 rounding
(tests/reference_parity.py: `allowed_ulps`), with exactly the reference's parameter count and parameter names.
"""

import pytest
import torch

from tests.numerics import check_close_to_scale
from tests.reference_parity import UNET_FIXTURES, allowed_ulps, load_unet_case, unet_case_names

pytestmark = pytest.mark.usefixtures("compute_threads")

CASES = unet_case_names()


def test_fixtures_exist_and_stay_small():
    assert len(CASES) >= 15
    size = sum(p.stat().st_size for p in UNET_FIXTURES.iterdir())
    assert size < 1.5e6, f"unet fixtures take {size / 1e6:.2f} MB"


@pytest.mark.parametrize("name", CASES)
def test_parameter_count_and_names_equal_the_reference(name):
    case = load_unet_case(name)
    unet = case.build()
    assert sum(p.numel() for p in unet.parameters()) == case.meta["param_count"]
    ours = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert ours == case.meta["state_shapes"]


@pytest.mark.parametrize("name", CASES)
def test_outputs_match_the_reference(name):
    case = load_unet_case(name)
    unet = case.loaded()
    assert case.outputs, "a case without outputs checks nothing"
    problems = []
    for output, expected in case.outputs.items():
        got = case.run(unet, output)
        assert got.shape == expected.shape, output
        assert expected.abs().max() > 1e-2, f"{output}: the reference output is ~0, the comparison would be vacuous"
        problems.append(check_close_to_scale(got, expected, ulps_of_scale=allowed_ulps(name), what=f"{name}/{output}"))
    problems = [problem for problem in problems if problem]
    assert not problems, "ours differs from the reference beyond float32 rounding:\n" + "\n".join(problems)


def test_cases_cover_every_reference_option():
    import inspect

    from dalle2_decoder.models import Unet

    defaults = {
        p.name: p.default
        for p in inspect.signature(Unet.__init__).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    ours_only = {"cross_attn_heads", "cross_attn_dim_head", "respect_attend_at_middle", "reference_release"}
    covered = set()
    for name in CASES:
        config = load_unet_case(name).meta["config"]
        for key, value in config.items():
            default = defaults.get(key)
            if isinstance(default, tuple):
                default = list(default)
            if value != default:
                covered.add(key)
    missing = set(defaults) - ours_only - covered
    assert not missing, f"no fixture case sets these options to a non-default value: {sorted(missing)}"


def test_decoder_state_mapping_keeps_unet_weights_and_says_why_it_drops_the_rest():
    from dalle2_decoder.models.reference_names import (
        decoder_state_from_reference,
        decoder_state_from_reference_with_dropped,
        decoder_state_to_reference,
        unet_state_from_reference,
    )

    case = load_unet_case(CASES[0])
    unet_state = case.reference_state()
    # The names of a reference Decoder's state dict: U-Nets, schedule buffers, and CLIP when it has one.
    reference = {f"unets.1.{k}": v for k, v in unet_state.items()}
    reference["noise_schedulers.1.betas"] = torch.zeros(3)
    reference["clip.clip.visual.proj"] = torch.zeros(2)
    mapped, dropped = decoder_state_from_reference_with_dropped(reference)
    assert mapped == {f"unets.1.{k}": v for k, v in unet_state.items()}
    assert {name for name, _ in dropped} == {"noise_schedulers.1.betas", "clip.clip.visual.proj"}
    assert all(reason for _, reason in dropped)
    assert decoder_state_to_reference(mapped) == mapped
    # Wrapper prefixes (DDP's module., torch.compile's _orig_mod.) are removed.
    wrapped = {f"module.unets.1._orig_mod.{k}": v for k, v in unet_state.items()}
    assert decoder_state_from_reference(wrapped) == mapped
    assert unet_state_from_reference({f"_orig_mod.{k}": v for k, v in unet_state.items()}) == unet_state
    with pytest.raises(ValueError, match="unexpected entry 'optimizer.state'"):
        decoder_state_from_reference({**reference, "optimizer.state": torch.zeros(1)})
