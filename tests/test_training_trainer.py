"""DecoderTrainer: optimizers, EMA, frozen U-Nets, non-finite steps and exact state round trips."""

import random

import pytest
import torch
from accelerate import Accelerator

from dalle2_decoder.config import DecoderConfig, TrainConfig, UnetConfig
from dalle2_decoder.tracking.checkpoint import CheckpointMismatchError, capture_rng_state, restore_rng_state
from dalle2_decoder.training.trainer import DecoderTrainer, warmup_factor

from .numerics import assert_close_to_scale

EMBED_DIM = 8
pytestmark = pytest.mark.usefixtures("compute_threads")
# Narrow attention (options of this package) keeps the U-Nets tiny: these tests are about training
# mechanics, not the architecture (the reference's is tested in test_reference_parity_unet.py).
TINY = {
    "cond_dim": 8,
    "num_resnet_blocks": 1,
    "attn_heads": 2,
    "attn_dim_head": 4,
    "cross_attn_heads": 2,
    "cross_attn_dim_head": 4,
    "init_cross_embed": False,
    "init_conv_kernel_size": 3,
}


def tiny_decoder(seed: int = 0):
    torch.manual_seed(seed)
    config = DecoderConfig(
        unets=[
            UnetConfig(dim=8, image_embed_dim=EMBED_DIM, dim_mults=(1, 2), options=TINY),
            UnetConfig(dim=8, image_embed_dim=EMBED_DIM, dim_mults=(1, 2), options=TINY),
        ],
        image_sizes=[8, 16],
        timesteps=50,
    )
    return config.create()


def make_trainer(seed: int = 0, **train_options) -> DecoderTrainer:
    options = {"device": "cpu", "lr": 1e-3, **train_options}
    return DecoderTrainer(tiny_decoder(seed), Accelerator(cpu=True), TrainConfig(**options))


def batch(seed: int = 1, size: int = 4):
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(size, 3, 16, 16, generator=generator),
        "image_embed": torch.randn(size, EMBED_DIM, generator=generator),
    }


def weights(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def test_each_trained_unet_gets_one_optimizer_and_ema_and_changes():
    trainer = make_trainer()
    before = [weights(unet) for unet in trainer.decoder.unets]
    for _ in range(2):
        losses = trainer.train_step(batch())
    assert set(losses) == {1, 2} and all(loss.ndim == 0 for loss in losses.values())
    assert set(trainer.optimizers) == {1, 2} and set(trainer.emas) == {1, 2}
    for number, unet in enumerate(trainer.decoder.unets):
        assert any(not torch.equal(before[number][k], v) for k, v in weights(unet).items())
    assert trainer.step == 2


def test_frozen_unet_has_no_optimizer_no_gradients_no_ema_and_is_unchanged():
    trainer = make_trainer(unet_training_mask=[False, True])
    frozen_before = weights(trainer.decoder.unets[0])
    for _ in range(3):
        losses = trainer.train_step(batch())
    assert set(losses) == {2}
    assert set(trainer.optimizers) == {2} and set(trainer.emas) == {2}
    assert all(not p.requires_grad and p.grad is None for p in trainer.decoder.unets[0].parameters())
    for name, tensor in weights(trainer.decoder.unets[0]).items():
        assert torch.equal(frozen_before[name], tensor), name


def test_ema_trails_weights_and_is_used_for_sampling():
    trainer = make_trainer(ema_beta=0.9)
    for _ in range(3):
        trainer.train_step(batch())
    live = trainer.decoder.unets[0]
    averaged = trainer.emas[1].averaged
    assert not all(torch.equal(a, b) for a, b in zip(live.parameters(), averaged.parameters()))
    with trainer.sampling_weights() as decoder:
        assert decoder.unets[0] is averaged and not decoder.training
    assert trainer.decoder.unets[0] is live  # restored afterwards
    model_weights = trainer.model_state_dict()
    ema_weights = averaged.state_dict()
    assert all(torch.equal(model_weights[f"unets.0.{k}"], v) for k, v in ema_weights.items())


def test_nonfinite_step_is_skipped_and_counted():
    trainer = make_trainer()
    trainer.train_step(batch())
    before = weights(trainer.decoder)
    bad = batch()
    bad["image"][0, 0, 0, 0] = float("nan")
    trainer.train_step(bad)
    assert trainer.nonfinite_steps == 1 and trainer.nonfinite_streak == 1
    after = weights(trainer.decoder)
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.train_step(batch())
    assert trainer.nonfinite_streak == 0 and trainer.nonfinite_steps == 1


def test_streak_of_nonfinite_steps_is_reported():
    trainer = make_trainer()
    trainer.max_nonfinite_streak = 2
    bad = batch()
    bad["image"][:] = float("inf")
    trainer.train_step(bad)
    assert not trainer.too_many_nonfinite
    trainer.train_step(bad)
    assert trainer.too_many_nonfinite


def test_gradient_accumulation_steps_optimizer_every_k_micro_batches():
    trainer = make_trainer(gradient_accumulation_steps=3)
    for _ in range(5):
        trainer.train_step(batch())
    assert trainer.micro_step == 5 and trainer.step == 1


def test_per_unet_learning_rates_and_warmup():
    trainer = make_trainer(lr=[1e-3, 2e-4], warmup_steps=[4, 2])
    assert trainer.unet_lr(1) == pytest.approx(1e-3 * 0.25)
    assert trainer.unet_lr(2) == pytest.approx(2e-4 * 0.5)
    for _ in range(5):
        trainer.train_step(batch())
    assert trainer.unet_lr(1) == pytest.approx(1e-3)
    assert [warmup_factor(s, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_state_round_trip_continues_exactly(tmp_path):
    # Reference: 4 uninterrupted steps.
    reference = make_trainer()
    torch.manual_seed(123)
    random.seed(123)  # the upsampler's blur augmentation draws from Python's generator, as the reference
    for step in range(4):
        reference.train_step(batch(step))
    # Interrupted after 2 steps, saved through a weights-only file, resumed in a fresh trainer.
    first = make_trainer()
    torch.manual_seed(123)
    random.seed(123)
    for step in range(2):
        first.train_step(batch(step))
    rng = capture_rng_state()
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = make_trainer(seed=99)  # different initialisation: everything must come from the file
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    restore_rng_state(rng)
    for step in range(2, 4):
        resumed.train_step(batch(step))
    assert resumed.step == reference.step == 4
    # Exactly: one process, the same kernels and thread count (compute_threads), and everything the
    # steps read restored bit for bit; any difference is state the checkpoint lost.
    expected, got = weights(reference.decoder), weights(resumed.decoder)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    for number in (1, 2):
        for a, b in zip(reference.emas[number].averaged.parameters(), resumed.emas[number].averaged.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mismatched_checkpoint_names_the_tensors():
    trainer = make_trainer()
    state = trainer.state_dict()
    key = next(k for k in state["decoder"] if k.endswith("weight") and state["decoder"][k].ndim == 4)
    state["decoder"][key] = torch.zeros(1)
    state["decoder"]["unets.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as error:
        trainer.load_state_dict(state)
    assert key in str(error.value) and "unets.0.extra.weight" in str(error.value)


def _run_ema(ema, network, steps):
    """Set the network's single weight to k + 1 before the k-th update (0-based), as a training run would."""
    seen = []
    for step in range(steps):
        with torch.no_grad():
            network.weight.fill_(float(step + 1))
        ema.update(network)
        seen.append(ema.averaged.weight.item())
    return seen


def test_ema_follows_dalle2_pytorchs_rule_by_default():
    from dalle2_decoder.training.ema import EMA

    # ema-pytorch as DALLE2-pytorch uses it, written out by hand: the first update copies; then
    # only every 10th update acts, copying up to update 100 and averaging after it with decay
    # 1 - (1 + n)^(-2/3), n = updates before it minus 100, capped at beta.
    beta, expected, value = 0.99, [], None
    for count in range(400):
        weight = float(count + 1)
        if count == 0 or (count % 10 == 0 and count <= 100):
            value = weight
        elif count % 10 == 0:
            decay = min(beta, 1 - (1 + (count - 100)) ** (-2 / 3))
            value = decay * value + (1 - decay) * weight
        expected.append(value)

    network = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(network, beta=beta)
    got = _run_ema(ema, network, 400)
    # Each value within 8 ulps of itself (rel 1e-6): the average is a float32 lerp of two values of its
    # size (under an ulp of rounding each update, measured on every kernel path), and the rounding of
    # earlier updates shrinks with the decay.
    assert got == pytest.approx(expected, rel=1e-6)
    assert got[5] == 1.0 and got[10] == 11.0 and got[100] == 101.0  # copies during the first 100 steps
    assert got[110] != 111.0  # the first average
    assert ema.current_decay() == pytest.approx(min(beta, 1 - (1 + 300) ** (-2 / 3)))
    # The count is saved: a restored average continues on the same schedule.
    restored = EMA(network, beta=beta)
    restored.load_state_dict(ema.state_dict())
    assert int(restored.num_updates) == 400 and restored.current_decay() == ema.current_decay()
    # The sharded load sets the count from outside the module's own loading: the schedule follows it,
    # whether through set_num_updates or a buffer filled in place and then forgotten.
    fresh = EMA(network, beta=beta)
    fresh.current_decay()  # caches the count of 0
    fresh.set_num_updates(torch.tensor(400))
    assert fresh.current_decay() == ema.current_decay()
    filled = EMA(network, beta=beta)
    filled.current_decay()
    filled.num_updates.fill_(400)
    filled.forget_cached_count()
    assert filled.current_decay() == ema.current_decay()


def test_ema_ratio_warmup_is_an_option_from_the_config():
    from dalle2_decoder.training.ema import EMA

    network = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(network, beta=0.9, update_after_step=0, update_every=1, warmup="ratio")
    expected, value = [], None
    for count in range(60):
        weight = float(count + 1)
        if count == 0:
            value = weight
        else:
            decay = min(0.9, (1 + count) / (10 + count))
            value = decay * value + (1 - decay) * weight
        expected.append(value)
    assert _run_ema(ema, network, 60) == pytest.approx(expected, rel=1e-6)
    trainer = make_trainer(ema_warmup="ratio", ema_update_after_step=0, ema_update_every=1, ema_beta=0.5)
    ema = trainer.emas[1]
    assert (ema.warmup, ema.update_after_step, ema.update_every, ema.beta) == ("ratio", 0, 1, 0.5)


def test_adamw_as_dalle2_pytorch_no_decay_on_biases_and_norms():
    trainer = make_trainer(wd=0.05)
    for number in (1, 2):
        unet = trainer.decoder.unets[number - 1]
        optimizer = trainer.optimizers[number]
        decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        assert len(decay_of) == sum(1 for _ in unet.parameters())
        for name, parameter in unet.named_parameters():
            assert decay_of[id(parameter)] == (0.05 if parameter.ndim >= 2 else 0.0), name
        assert any(p.ndim < 2 for p in unet.parameters()) and any(p.ndim >= 2 for p in unet.parameters())
        for group in optimizer.param_groups:
            assert group["betas"] == (0.9, 0.99) and group["eps"] == 1e-8
    everything = make_trainer(wd=0.05, group_wd_params=False)
    assert [g["weight_decay"] for g in everything.optimizers[1].param_groups] == [0.05]


def test_cpu_adamw_is_the_fused_kernel_and_steps_as_torchs_loop_to_float_error():
    # The fused kernel on the CPU too: torch's CPU default is a Python loop over the tensors (7% of the
    # demo's step). It must not move training off the reference's (which uses that loop) beyond rounding.
    trainer = make_trainer(wd=0.05)
    for optimizer in trainer.optimizers.values():
        assert all(group["fused"] for group in optimizer.param_groups)
    fused = trainer.optimizers[1]
    unet = trainer.decoder.unets[0]
    loop_params = [p.detach().clone().requires_grad_(True) for p in unet.parameters()]
    by_id = {id(p): q for p, q in zip(unet.parameters(), loop_params)}
    loop = torch.optim.AdamW(
        [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[id(p)] for p in g["params"]]}
            for g in fused.param_groups
        ],
        fused=False,
        foreach=False,
    )
    generator = torch.Generator().manual_seed(0)
    steps = 3
    for _ in range(steps):
        for p, q in zip(unet.parameters(), loop_params):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    # Each step rounds the new weight (a few ulps of |weight|) and the update (a few ulps of lr, the
    # size of an Adam update); over 3 steps at most 4 ulps per step of the larger of the two.
    lr = fused.param_groups[0]["lr"]
    for p, q in zip(unet.parameters(), loop_params):
        assert_close_to_scale(p.detach(), q.detach(), ulps_of_scale=4 * steps, scale=float(q.abs().max()) + lr)


def test_gradients_are_clipped_to_max_grad_norm_before_the_step():
    norms = {}

    def record(trainer):
        for number, optimizer in trainer.optimizers.items():
            original = optimizer.step

            def step(*args, number=number, original=original, optimizer=optimizer, **kwargs):
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                norms.setdefault(number, []).append(
                    float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
                )
                return original(*args, **kwargs)

            optimizer.step = step

    clipped = make_trainer(max_grad_norm=1e-3)
    record(clipped)
    clipped.train_step(batch())
    assert all(n[0] == pytest.approx(1e-3, rel=1e-3) for n in norms.values())
    norms.clear()
    free = make_trainer(max_grad_norm=None)
    record(free)
    free.train_step(batch())
    assert all(n[0] > 1e-2 for n in norms.values())


def test_static_graph_default_and_amp_without_effect_as_dalle2_pytorch(fresh_accelerate_state):
    from dalle2_decoder.config import TrainDecoderConfig
    from dalle2_decoder.runtime import create_accelerator

    assert TrainConfig().static_graph is True
    raw = {
        "decoder": {"unets": [{"dim": 8, "image_embed_dim": 8}], "image_sizes": [16]},
        "data": {"webdataset_base_url": "/tmp/x/{}.tar", "num_workers": 0},
        "train": {"amp": True, "device": "cpu"},
        "tracker": {"log": {"log_type": "console"}, "save": {"save_to": "local", "save_latest_to": "x.pth"}},
    }
    config = TrainDecoderConfig.from_dict(raw)
    assert any("train.amp: has no effect" in note for note in config.notes())
    assert create_accelerator(config).mixed_precision == "no"


def test_static_graph_is_used_with_one_trained_unet_only():
    from dalle2_decoder.config import TrainDecoderConfig
    from dalle2_decoder.runtime import ddp_static_graph

    unet = {"dim": 8, "image_embed_dim": 8}
    raw = {
        "decoder": {"unets": [unet, unet], "image_sizes": [16, 32]},
        "data": {"webdataset_base_url": "/tmp/x/{}.tar", "num_workers": 0},
        "train": {"device": "cpu"},
        "tracker": {"log": {"log_type": "console"}, "save": {"save_to": "local", "save_latest_to": "x.pth"}},
    }
    static, why = ddp_static_graph(TrainDecoderConfig.from_dict(raw))
    assert static is False and why.startswith("train.static_graph: not used with 2 trained U-Nets")
    raw["train"]["unet_training_mask"] = [False, True]
    assert ddp_static_graph(TrainDecoderConfig.from_dict(raw)) == (True, None)
    raw["train"]["static_graph"] = False
    raw["train"]["unet_training_mask"] = None
    assert ddp_static_graph(TrainDecoderConfig.from_dict(raw)) == (False, None)


@pytest.fixture
def fresh_accelerate_state():
    # Accelerate keeps one process-wide state; a test that asks for another precision resets it
    # before and after, so the other tests see the default again.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_steps_on_the_cpu(fresh_accelerate_state):
    trainer = DecoderTrainer(
        tiny_decoder(), Accelerator(cpu=True, mixed_precision="bf16"), TrainConfig(device="cpu", lr=1e-3)
    )
    before = weights(trainer.decoder)
    losses = trainer.train_step(batch())
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses.values())
    assert trainer.nonfinite_steps == 0
    assert any(not torch.equal(before[k], v) for k, v in weights(trainer.decoder).items())
    # Weights and optimizer state stay in fp32 under autocast.
    assert all(p.dtype == torch.float32 for p in trainer.decoder.parameters())
