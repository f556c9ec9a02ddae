"""The EMA engine against the plain recurrence, torch's AveragedModel, and its own promises."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import Tied, make_net, train_steps
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mlflow_ema import (
    EMA,
    BiasCorrectedDecay,
    ConstantDecay,
    HalfLifeDecay,
    IncompatibleModelError,
    RampDecay,
    WarmupDecay,
)


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def test_shadow_starts_as_a_copy_of_the_weights():
    model = make_net()
    ema = EMA(model, decay=0.9)
    for key, value in ema.model_state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
        if value.is_floating_point():
            assert value.data_ptr() != model.state_dict()[key].data_ptr(), "shadow must be a copy"


def test_matches_the_plain_recurrence_on_real_training(digits):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    decay = 0.8
    ema = EMA(model, decay=decay)
    expected = float_state(model)

    def both():
        ema.update()
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = decay * expected[k] + (1 - decay) * v.detach()

    train_steps(model, opt, digits, 25, after_step=both)
    got = ema.model_state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(got["0.weight"], model[0].weight), "the average must lag the weights"
    assert ema.num_updates == ema.step == 25 and ema.last_decay == decay


def test_matches_torch_averaged_model(digits):
    model = make_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ema = EMA(model, decay=0.95)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.95), use_buffers=True)
    reference.update_parameters(model)  # AveragedModel's first call copies, as our constructor does

    def both():
        ema.update()
        reference.update_parameters(model)

    train_steps(model, opt, digits, 30, after_step=both)
    ours = ema.model_state_dict()
    for k, v in reference.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_integer_buffers_follow_the_model_and_are_never_averaged(digits):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.5)
    train_steps(model, opt, digits, 7, after_step=ema.update)
    tracked = ema.model_state_dict()["1.num_batches_tracked"]
    assert tracked.dtype == torch.int64 and int(tracked) == 7
    assert "1.num_batches_tracked" not in ema.state_dict()["shadow"]


@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_float_buffer_policy(digits, buffers):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9, buffers=buffers)
    train_steps(model, opt, digits, 10, after_step=ema.update)
    same = torch.equal(ema.model_state_dict()["1.running_mean"], model[1].running_mean)
    assert same == (buffers == "copy")


@pytest.mark.parametrize("frozen", ["average", "copy"])
def test_frozen_parameter_policy(digits, frozen):
    model = make_net()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ema = EMA(model, decay=0.9, frozen=frozen)
    train_steps(model, opt, digits, 5, after_step=ema.update)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # changed by hand, e.g. a re-initialisation
    ema.update()
    got = ema.model_state_dict()["0.weight"]
    if frozen == "copy":
        assert torch.equal(got, model[0].weight)
        assert "0.weight" not in ema.state_dict()["shadow"]
    else:
        torch.testing.assert_close(got, model[0].weight - 0.9)


def test_low_precision_weights_are_averaged_in_fp32(digits):
    model = make_net().to(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    assert all(t.dtype == torch.float32 for t in ema.state_dict()["shadow"].values())
    start = ema.model_state_dict()["3.weight"].clone()
    with torch.no_grad():
        model[3].weight.add_(0.5)
    ema.update()
    # A bf16 shadow could not move by 0.0005; the fp32 one does, by exactly (1-decay)*delta.
    moved = ema.model_state_dict()["3.weight"] - start
    torch.testing.assert_close(moved, torch.full_like(moved, 0.0005), rtol=2e-2, atol=1e-5)


def test_dtype_and_device_options():
    model = make_net().double()
    assert EMA(model).state_dict()["shadow"]["0.weight"].dtype == torch.float64
    ema = EMA(make_net(), dtype=torch.float64, device="cpu")
    assert ema.state_dict()["shadow"]["0.weight"].dtype == torch.float64
    ema.update()


def test_model_cast_after_the_ema_was_built_is_followed():
    model = make_net()
    ema = EMA(model, decay=0.5)
    model.to(torch.bfloat16)
    with torch.no_grad():
        model[3].weight.fill_(1.0)
    ema.update()
    assert ema.state_dict()["shadow"]["3.weight"].dtype == torch.float32
    before = make_net()[3].weight
    torch.testing.assert_close(ema.model_state_dict()["3.weight"], 0.5 * before + 0.5)


def test_hot_path_fuses_one_lerp_per_group_without_state_dict_or_host_sync(monkeypatch):
    model = make_net()
    ema = EMA(model, decay=0.9)
    calls = []
    real_lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a: calls.append(len(a[0])) or real_lerp(*a))

    def forbidden(*args, **kwargs):
        raise AssertionError("update() must not walk state_dict() or sync with the host")

    monkeypatch.setattr(nn.Module, "state_dict", forbidden)
    monkeypatch.setattr(nn.Module, "named_parameters", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    for _ in range(3):
        ema.update()
    # 4 weights + 4 BatchNorm floats (incl. running stats) in one (cpu, fp32) group.
    assert calls == [8, 8, 8]


def test_unwraps_torch_compile_and_ddp():
    model = make_net()
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until called
    ema = EMA(compiled)
    assert set(ema.model_state_dict()) == set(model.state_dict())
    ema.update(compiled)

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = EMA(ddp)
        assert set(ema.model_state_dict()) == set(model.state_dict())
        ema.update(ddp)
    finally:
        dist.destroy_process_group()


# -- schedules ------------------------------------------------------------------------


def test_schedules_formulas():
    assert ConstantDecay(0.99)(1) == ConstantDecay(0.99)(10_000) == 0.99
    warm = WarmupDecay(decay=0.9999, gamma=1.0, power=2 / 3)
    assert warm(10) == pytest.approx(1 - 11 ** (-2 / 3))
    assert warm(10**12) == 0.9999
    assert WarmupDecay(decay=0.99, min_decay=0.5)(1) == 0.5
    assert RampDecay(0.9999, tau=2000)(2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    half = HalfLifeDecay(half_life=100)
    assert half(1) ** 100 == pytest.approx(0.5)
    assert BiasCorrectedDecay(0.9)(1) == 0.0


def test_bias_corrected_schedule_equals_the_zero_started_average_divided_by_1_minus_beta_t(digits):
    beta = 0.9
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=BiasCorrectedDecay(beta))
    zero_started = {k: torch.zeros_like(v) for k, v in float_state(model).items()}
    t = 0

    def both():
        nonlocal t
        t += 1
        ema.update()
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                zero_started[k].mul_(beta).add_(v.detach(), alpha=1 - beta)

    train_steps(model, opt, digits, 12, after_step=both)
    got = ema.model_state_dict()
    for k, v in zero_started.items():
        torch.testing.assert_close(got[k], v / (1 - beta**t), rtol=1e-5, atol=1e-6, msg=k)


def test_warmup_with_power_one_is_the_running_mean(digits):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=WarmupDecay(decay=0.999999, gamma=1.0, power=1.0))
    snapshots = [float_state(model)["0.weight"]]
    train_steps(
        model,
        opt,
        digits,
        9,
        after_step=lambda: (ema.update(), snapshots.append(float_state(model)["0.weight"])),
    )
    torch.testing.assert_close(ema.model_state_dict()["0.weight"], torch.stack(snapshots).mean(0))


def test_update_every_and_start_step(digits):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.5, update_every=2, start_step=4)
    seen = []

    def record():
        ema.update()
        seen.append((ema.step, ema.num_updates, float_state(model)["0.weight"]))

    train_steps(model, opt, digits, 8, after_step=record)
    assert [(s, n) for s, n, _ in seen] == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 1), (7, 1), (8, 2)]
    # Copied at step 4, then averaged at 6 and 8.
    w4, w6, w8 = seen[3][2], seen[5][2], seen[7][2]
    torch.testing.assert_close(ema.model_state_dict()["0.weight"], 0.25 * w4 + 0.25 * w6 + 0.5 * w8)


# -- using the averaged weights ---------------------------------------------------------


def test_swap_puts_ema_weights_in_and_restores_raw_weights_exactly(digits):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    train_steps(model, opt, digits, 10, after_step=ema.update)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = {k: v.clone() for k, v in ema.model_state_dict().items()}
    assert not torch.equal(raw["0.weight"], averaged["0.weight"])
    with ema.swap() as swapped:
        assert swapped is model
        for k, v in model.state_dict().items():
            assert torch.equal(v, averaged[k]), k
    # The seed's restore() copied the shadow back; the raw weights must return bit for bit.
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), k
    with pytest.raises(ZeroDivisionError), ema.swap():
        raise ZeroDivisionError
    assert torch.equal(model[0].weight, raw["0.weight"]), "restored after an exception too"


def test_swap_guards_against_misuse():
    ema = EMA(make_net())
    with ema.swap():
        with pytest.raises(RuntimeError, match="inside EMA.swap"):
            ema.update()
        with pytest.raises(RuntimeError, match="already active"), ema.swap():
            pass


def test_copy_to_another_model(digits):
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, decay=0.9)
    train_steps(model, opt, digits, 5, after_step=ema.update)
    other = make_net(seed=1)
    ema.copy_to(other)
    for k, v in other.state_dict().items():
        assert torch.equal(v, ema.model_state_dict()[k]), k
    ema.copy_to()
    assert torch.equal(model[0].weight, other[0].weight)


# -- saving and resuming ------------------------------------------------------------


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(digits, tmp_path):
    def fresh():
        model = make_net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, EMA(model, decay=WarmupDecay(decay=0.99, power=3 / 4), update_every=2)

    model, opt, ema = fresh()
    train_steps(model, opt, digits, 20, after_step=ema.update)
    uninterrupted = ema.model_state_dict()

    model, opt, ema = fresh()
    train_steps(model, opt, digits, 11, after_step=ema.update)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}
    torch.save(state, tmp_path / "state.pt")
    del model, opt, ema

    model, opt, _ = fresh()
    ema = EMA(model, decay=0.5)  # built differently: the saved schedule and counters win
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    ema.load_state_dict(state["ema"])
    assert ema.schedule == WarmupDecay(decay=0.99, power=3 / 4) and ema.update_every == 2
    train_steps(model, opt, digits, 9, start=11, after_step=ema.update)
    for k, v in ema.model_state_dict().items():
        assert torch.equal(v, uninterrupted[k]), k
    assert ema.step == 20 and ema.num_updates == 10


# -- bad input ------------------------------------------------------------------------


def test_model_without_floating_point_tensors_is_refused():
    model = nn.Module()
    model.register_buffer("count", torch.zeros(3, dtype=torch.long))
    with pytest.raises(IncompatibleModelError, match="no floating-point tensors"):
        EMA(model)


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1, float("nan"), "0.9"])
def test_decay_outside_the_open_unit_interval_is_refused(decay):
    with pytest.raises(ValueError, match=r"decay must be a number in \(0, 1\)"):
        EMA(make_net(), decay=decay)


def test_a_schedule_returning_nonsense_is_refused():
    ema = EMA(make_net(), decay=lambda t: 1.5)
    with pytest.raises(ValueError, match="decay schedule returned 1.5"):
        ema.update()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"update_every": 0},
        {"start_step": -1},
        {"buffers": "keep"},
        {"frozen": "skip"},
        {"dtype": torch.int32},
    ],
)
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        EMA(make_net(), **kwargs)


def test_update_from_a_model_of_another_structure_is_refused():
    ema = EMA(make_net(hidden=32))
    with pytest.raises(IncompatibleModelError, match=r"shape differs for 0.weight \[48, 64\] vs \[32, 64\]"):
        ema.update(make_net(hidden=48))
    with pytest.raises(IncompatibleModelError, match="missing 1.weight"):
        ema.update(nn.Sequential(nn.Linear(64, 32)))
    ema.update(make_net(seed=3))  # same structure: fine


def test_load_state_dict_of_another_models_ema_is_refused():
    ema = EMA(make_net(hidden=32))
    with pytest.raises(IncompatibleModelError, match="does not match this model"):
        ema.load_state_dict(EMA(make_net(hidden=16)).state_dict())
    with pytest.raises(IncompatibleModelError, match="not an mlflow-ema EMA state"):
        ema.load_state_dict(make_net().state_dict())


def test_tied_weights_have_one_shadow():
    model = Tied()
    ema = EMA(model)
    assert list(ema.state_dict()["shadow"]) == ["embed.weight"]
    sd = ema.model_state_dict()
    assert sd["head.weight"] is sd["embed.weight"]


def test_deferred_offload_path_averages_once_the_copy_is_done(monkeypatch):
    """The CUDA -> CPU offload path (pinned staging, non_blocking copy, averaging deferred
    until the copy's event completes) exercised on CPU with a stand-in event."""
    events = []

    class FakeEvent:
        def record(self):
            events.append("record")

        def synchronize(self):
            events.append("synchronize")

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    model = make_net().to(torch.bfloat16)  # bf16 weights, fp32 shadow: a staged group
    ema = EMA(model, decay=0.5)
    for group in ema._plan:
        group.deferred = True
    start = ema.state_dict()["shadow"]["3.weight"].clone()
    with torch.no_grad():
        model[3].weight.add_(1.0)
    ema.update()
    assert events == ["record"]
    assert torch.equal(ema._shadow["3.weight"], start), "averaging waits for the copy"
    averaged = ema.model_state_dict()["3.weight"]  # any read completes it
    assert events == ["record", "synchronize"]
    torch.testing.assert_close(averaged, start + 0.5, rtol=1e-2, atol=1e-2)
