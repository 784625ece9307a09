import pytest
import torch

from simpletuner.config.settings import Settings
from simpletuner.training.ema import EMA


def toy():
    return [torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[4.0]]))]


def settings(**extra):
    return Settings({"use_ema": True, "ema_decay": 0.9, **extra})


@pytest.mark.parametrize("extra", [
    {},
    {"ema_foreach_disable": True},
    {"ema_device": "accelerator"},
    {"ema_device": "cpu", "ema_cpu_only": True},
])
def test_ema_math_on_two_parameters(extra):
    params = toy()
    ema = EMA(params, settings(**extra))
    with torch.no_grad():
        params[0].copy_(torch.tensor([11.0, 12.0]))
        params[1].fill_(14.0)
    assert ema.update(1)
    # shadow = 0.9 * old + 0.1 * new
    assert torch.allclose(ema.shadow[0], torch.tensor([2.0, 3.0]))
    assert torch.allclose(ema.shadow[1], torch.tensor([[5.0]]))
    ema.update(2)
    assert torch.allclose(ema.shadow[0], torch.tensor([0.9 * 2.0 + 1.1, 0.9 * 3.0 + 1.2]))
    assert torch.allclose(params[0], torch.tensor([11.0, 12.0]))  # the model is untouched
    assert ema.num_updates == 2


def test_update_interval_skips_steps():
    params = toy()
    ema = EMA(params, settings(ema_update_interval=3))
    with torch.no_grad():
        params[1].fill_(14.0)
    assert [ema.update(step) for step in range(1, 7)] == [False, False, True, False, False, True]
    assert ema.num_updates == 2
    assert torch.allclose(ema.shadow[1], torch.tensor([[14.0 - 10.0 * 0.81]]))


def test_cpu_storage():
    ema = EMA(toy(), settings(ema_device="cpu"))
    assert all(s.device.type == "cpu" for s in ema.shadow)


def test_swapped_in_puts_average_in_and_restores():
    params = toy()
    ema = EMA(params, settings())
    with torch.no_grad():
        params[0].copy_(torch.tensor([11.0, 12.0]))
    ema.update(1)
    with ema.swapped_in():
        assert torch.allclose(params[0], torch.tensor([2.0, 3.0]))
    assert torch.allclose(params[0], torch.tensor([11.0, 12.0]))
    with pytest.raises(RuntimeError):
        with ema.swapped_in(params):
            raise RuntimeError("validation failed")
    assert torch.allclose(params[0], torch.tensor([11.0, 12.0]))


def test_copy_to_other_parameters():
    ema = EMA(toy(), settings())
    others = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1, 1))]
    ema.copy_to(others)
    assert torch.equal(others[0], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="tracks 2 parameters"):
        ema.copy_to(others[:1])


def test_state_dict_round_trip():
    params = toy()
    ema = EMA(params, settings())
    with torch.no_grad():
        params[0].copy_(torch.tensor([11.0, 12.0]))
    ema.update(1)
    restored = EMA(toy(), settings())
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow[0], ema.shadow[0])
    assert restored.num_updates == 1
    mismatch = EMA([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1, 1))], settings())
    with pytest.raises(ValueError, match="shape"):
        mismatch.load_state_dict(ema.state_dict())


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(toy(), settings(ema_decay=1.5))
