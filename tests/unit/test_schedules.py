"""Alpha schedules for PD: shapes at chosen steps, and WSD-alpha tied to the loop's WSD LR."""

from __future__ import annotations

import pytest
import torch

from minidistill.training.loop import make_scheduler
from minidistill.training.schedules import alpha_at, wsd_phases


def test_constant():
    assert [alpha_at(s, 50, schedule="constant", alpha=0.7, alpha_min=0.1) for s in (0, 25, 49)] == [0.7] * 3


def test_linear_increase_and_decrease_endpoints():
    up = [alpha_at(s, 11, schedule="linear_increase", alpha=0.9, alpha_min=0.1) for s in range(11)]
    down = [alpha_at(s, 11, schedule="linear_decrease", alpha=0.9, alpha_min=0.1) for s in range(11)]
    assert up[0] == pytest.approx(0.1) and up[-1] == pytest.approx(0.9) and up[5] == pytest.approx(0.5)
    assert down[0] == pytest.approx(0.9) and down[-1] == pytest.approx(0.1) and down[5] == pytest.approx(0.5)
    assert all(a < b for a, b in zip(up, up[1:])) and all(a > b for a, b in zip(down, down[1:]))
    assert alpha_at(0, 1, schedule="linear_increase", alpha=0.9) == 0.9  # a single step: the end value


def test_wsd_phases():
    kw = dict(schedule="wsd", alpha=0.9, alpha_min=0.1, warmup_steps=10, decay_steps=20)
    a = [alpha_at(s, 100, **kw) for s in range(100)]
    assert wsd_phases(100, 10, 20) == (10, 70, 20)
    assert a[0] == pytest.approx(0.1)  # warm-up starts at alpha_min (the LR starts at 0)
    assert a[5] == pytest.approx(0.5)  # halfway through the warm-up
    assert all(x == pytest.approx(0.9) for x in a[10:81])  # stable phase at alpha (first decay step: progress 0)
    assert a[90] == pytest.approx(0.5)  # cosine decay halfway
    assert 0.1 < a[99] < 0.11 and all(x > y for x, y in zip(a[80:], a[81:]))
    # default decay: 10% of the steps, like loop.make_scheduler
    assert wsd_phases(100, 10, None) == (10, 80, 10)
    assert alpha_at(89, 100, schedule="wsd", alpha=0.9, warmup_steps=10) == pytest.approx(0.9)
    assert alpha_at(95, 100, schedule="wsd", alpha=0.9, warmup_steps=10) == pytest.approx(0.45)


@pytest.mark.parametrize("total,warm,decay", [(100, 10, 20), (37, 5, None), (10, 0, 3), (8, 8, None), (5, 2, 10)])
def test_wsd_alpha_follows_the_wsd_learning_rate(total, warm, decay):
    """alpha_min + (alpha - alpha_min) * lr/peak at every step, with the loop's own scheduler."""

    class Cfg:
        scheduler, warmup_steps, decay_steps = "wsd", warm, decay

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = make_scheduler(opt, Cfg, total)
    for step in range(total):
        lr = sched.get_last_lr()[0]  # the LR this optimizer step uses
        a = alpha_at(step, total, schedule="wsd", alpha=0.8, alpha_min=0.2, warmup_steps=warm, decay_steps=decay)
        assert a == pytest.approx(0.2 + 0.6 * lr / 2.0, abs=1e-12), step
        opt.step()
        sched.step()


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown alpha schedule"):
        alpha_at(0, 10, schedule="cosine")


@pytest.mark.parametrize(
    "total,warm,decay",
    [
        (100, 10, 20),
        (37, 5, None),
        (10, 0, 3),
        (8, 8, None),
        (5, 2, 10),
        (1, 0, None),
        (12, 2, 4),
        (30, 3, 8),
        (7, 20, 2),
    ],
)
def test_wsd_lr_is_bitwise_transformers_warmup_stable_decay(total, warm, decay):
    """loop.make_scheduler builds WSD from schedules.wsd_factor (the definition alpha uses); its LR
    equals transformers' warmup_stable_decay (what it used before) bit for bit, also after a resume."""
    from transformers import get_scheduler

    class Cfg:
        scheduler, warmup_steps, decay_steps = "wsd", warm, decay

    def pair():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=3e-3)
        t = max(1, total)
        w = min(warm, t)
        d = decay if decay is not None else max(1, t // 10)
        ref = get_scheduler(
            "warmup_stable_decay",
            opt,
            num_warmup_steps=w,
            num_training_steps=t,
            scheduler_specific_kwargs={"num_decay_steps": min(d, t - w)},
        )
        opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
        return opt, ref, opt2, make_scheduler(opt2, Cfg, total)

    opt, ref, opt2, ours = pair()
    for step in range(total + 2):
        assert ours.get_last_lr() == ref.get_last_lr(), step  # exact float equality
        opt.step(), opt2.step()
        ref.step(), ours.step()
        if step == total // 2:  # a resume from a checkpoint of the scheduler
            state = ours.state_dict()
            _, _, opt3, ours = pair()
            ours.load_state_dict(state)
