import math

import pytest
import torch

from simpletuner.config.settings import Settings
from simpletuner.training.lr_schedules import SCHEDULES, build_lr_scheduler, scaled_learning_rate

LR = 1.0
TOTAL = 100
WARMUP = 10


def lrs(name, steps=TOTAL + 5, total=TOTAL, num_processes=1, **extra):
    settings = Settings({"lr_scheduler": name, "learning_rate": LR, "lr_warmup_steps": WARMUP, **extra})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_lr_scheduler(settings, optimizer, total, num_processes)
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("name", [s for s in SCHEDULES if s != "constant"])
def test_every_schedule_warms_up_linearly(name):
    values = lrs(name)
    assert values[0] == 0.0
    assert values[5] == pytest.approx(0.5)
    assert values[WARMUP] == pytest.approx(1.0)


def test_constant_has_no_warmup():
    assert set(lrs("constant")) == {1.0}


def test_constant_with_warmup_holds_peak():
    values = lrs("constant_with_warmup")
    assert all(v == pytest.approx(1.0) for v in values[WARMUP:])


def test_linear_decays_to_zero():
    values = lrs("linear")
    assert values[55] == pytest.approx(0.5)
    assert values[TOTAL] == 0.0 and values[-1] == 0.0


def test_cosine_half_wave():
    values = lrs("cosine")
    assert values[55] == pytest.approx(0.5)
    assert values[32] == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 90)))
    assert values[TOTAL] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values[WARMUP:], values[WARMUP + 1:]))


def test_cosine_with_restarts_cycles():
    values = lrs("cosine_with_restarts", lr_num_cycles=3)
    # Cycles of 30 steps after warmup: restart to the peak at steps 40 and 70.
    assert values[39] < 0.01 and values[40] == pytest.approx(1.0)
    assert values[69] < 0.01 and values[70] == pytest.approx(1.0)
    assert values[25] == pytest.approx(0.5)
    assert values[TOTAL] == 0.0


def test_sine_is_a_smooth_wave():
    values = lrs("sine", lr_num_cycles=2)
    # Two full periods over 90 steps: troughs at 32.5 and 77.5, peak again at 55 and 100.
    assert values[55] == pytest.approx(1.0)
    assert values[TOTAL] == pytest.approx(1.0)
    assert values[32] < 0.01
    steps = [abs(a - b) for a, b in zip(values[WARMUP:TOTAL], values[WARMUP + 1:TOTAL])]
    assert max(steps) < 0.1


def test_polynomial_reaches_lr_end():
    values = lrs("polynomial", lr_end=0.1, lr_power=2.0)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.25)
    assert values[TOTAL] == pytest.approx(0.1)
    assert values[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_end"):
        lrs("polynomial", lr_end=2.0)


def test_num_processes_stretches_schedule():
    values = lrs("linear", steps=30, num_processes=2)
    assert values[10] == pytest.approx(0.5)  # warmup is now 20 scheduler steps
    assert values[20] == pytest.approx(1.0)


def test_resume_from_state_dict_lands_on_same_lr():
    settings = Settings({"lr_scheduler": "cosine", "learning_rate": LR, "lr_warmup_steps": WARMUP})
    first = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_lr_scheduler(settings, first, TOTAL)
    for _ in range(37):
        first.step()
        scheduler.step()
    second = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    resumed = build_lr_scheduler(settings, second, TOTAL)
    resumed.load_state_dict(scheduler.state_dict())
    second.step()
    resumed.step()
    first.step()
    scheduler.step()
    assert resumed.get_last_lr() == pytest.approx(scheduler.get_last_lr())


def test_unknown_schedule_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(ValueError, match="lr_scheduler='wave'"):
        build_lr_scheduler(Settings({"lr_scheduler": "wave"}), optimizer, TOTAL)


def test_learning_rate_scaling():
    base = {"learning_rate": 1e-4, "train_batch_size": 2, "gradient_accumulation_steps": 4}
    assert scaled_learning_rate(Settings(base), 2) == pytest.approx(1e-4)
    assert scaled_learning_rate(Settings({**base, "lr_scale": True}), 2) == pytest.approx(1e-4 * 16)
    assert scaled_learning_rate(Settings({**base, "lr_scale": True, "lr_scale_sqrt": True}), 2) == \
        pytest.approx(1e-4 * 4)
