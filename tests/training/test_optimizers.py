import pytest
import torch

from simpletuner.config.errors import ConfigError
from simpletuner.config.option_groups.a3_training import OPTIMIZERS
from simpletuner.config.settings import Settings
from simpletuner.training.optimizer_classes import AdamWBF16, stochastic_round_to_bf16
from simpletuner.training.optimizers import (
    OPTIMIZER_CHOICES,
    build_optimizer,
    optimizer_eval_mode,
    optimizer_train_mode,
    parse_optimizer_config,
)

# Prodigy learns its own step size; the usual advice is learning_rate=1.0.
_LEARNING_RATES = {"prodigy": 1.0}


def _settings(optimizer: str, **extra) -> Settings:
    return Settings({"optimizer": optimizer, "learning_rate": _LEARNING_RATES.get(optimizer, 1e-2), **extra})


def _toy_problem():
    torch.manual_seed(0)
    # 64x64 weights so torchao's low-bit optimizers really quantize their state (they skip tiny tensors)
    model = torch.nn.Linear(64, 64, bias=False)
    inputs = torch.randn(16, 64)
    targets = inputs.flip(1)
    return model, inputs, targets


def test_every_listed_choice_is_buildable():
    assert set(OPTIMIZER_CHOICES) == set(OPTIMIZERS)


@pytest.fixture
def compile_without_codegen(monkeypatch):
    """torchao's low-bit optimizers wrap their update in torch.compile. Generating the C++ kernels for
    them takes 10-60 s per optimizer on a cold cache here, so these tests trace with the eager backend:
    the same graph and quantized state, run without code generation. (The compiled path was checked by
    hand on this CPU and is exercised on GPU machines.)"""
    real_compile = torch.compile

    def compile_eagerly(model=None, **options):
        return real_compile(model, **{**options, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_eagerly)


@pytest.mark.parametrize("name", sorted(OPTIMIZER_CHOICES))
def test_three_steps_reduce_a_toy_loss(name, request):
    if name.startswith("ao-"):
        request.getfixturevalue("compile_without_codegen")
    model, inputs, targets = _toy_problem()
    optimizer = build_optimizer(_settings(name), [{"params": model.parameters()}])
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    optimizer_eval_mode(optimizer)
    final = torch.nn.functional.mse_loss(model(inputs), targets).item()
    assert final < losses[0], (name, losses, final)
    if name.startswith("ao-"):  # the moments really are stored in low-bit form
        assert type(optimizer.state[model.weight]["exp_avg"]).__name__.startswith("OptimState")


def test_optimizer_config_parsing():
    parsed = parse_optimizer_config("d_coef=0.1, betas=(0.9,0.99),decouple=true,growth_rate=inf,slice_p=11,"
                                    "data_format=channels_last,beta3=none")
    assert parsed == {"d_coef": 0.1, "betas": (0.9, 0.99), "decouple": True, "growth_rate": float("inf"),
                      "slice_p": 11, "data_format": "channels_last", "beta3": None}
    assert isinstance(parsed["slice_p"], int)
    assert parse_optimizer_config(None) == {} and parse_optimizer_config("  ") == {}
    with pytest.raises(ConfigError, match="not key=value"):
        parse_optimizer_config("d_coef")
    with pytest.raises(ConfigError, match="unbalanced"):
        parse_optimizer_config("betas=(0.9,0.99")


def test_optimizer_config_overrides_defaults_and_rejects_unknown_keys():
    model, _, _ = _toy_problem()
    optimizer = build_optimizer(_settings("prodigy", optimizer_config="d_coef=0.5,slice_p=3"),
                                [{"params": model.parameters()}])
    assert optimizer.param_groups[0]["d_coef"] == 0.5 and optimizer.param_groups[0]["slice_p"] == 3
    with pytest.raises(ConfigError) as raised:
        build_optimizer(_settings("optimi-adamw", optimizer_config="d_coef=0.5"), [{"params": model.parameters()}])
    message = str(raised.value)
    assert "optimizer_config" in message and "d_coef" in message and "kahan_sum" in message
    with pytest.raises(ConfigError, match="learning_rate"):
        build_optimizer(_settings("adamw_bf16", optimizer_config="lr=1"), [{"params": model.parameters()}])


def _betas(optimizer) -> tuple:
    group = optimizer.param_groups[0]  # optimi stores beta1, beta2, ... separately
    return tuple(group[key] for key in ("beta1", "beta2", "beta3") if key in group)


def test_beta_precedence():
    model, _, _ = _toy_problem()
    groups = lambda: [{"params": model.parameters()}]  # noqa: E731
    assert _betas(build_optimizer(_settings("optimi-lion"), groups())) == (0.9, 0.99)
    assert _betas(build_optimizer(_settings("optimi-lion", adam_beta2=0.95), groups())) == (0.9, 0.95)
    both = build_optimizer(_settings("optimi-lion", adam_beta2=0.95, optimizer_config="betas=(0.8,0.9)",
                                     optimizer_beta1=0.7), groups())
    assert _betas(both) == (0.7, 0.9)
    assert _betas(build_optimizer(_settings("optimi-adan", optimizer_beta2=0.5), groups())) == (0.98, 0.5, 0.99)
    with pytest.raises(ConfigError, match="has no betas"):
        build_optimizer(_settings("optimi-sgd", optimizer_beta1=0.9), groups())


def test_explicit_adam_settings_reach_the_optimizer():
    model, _, _ = _toy_problem()
    optimizer = build_optimizer(_settings("optimi-adamw", adam_weight_decay=0.3, adam_epsilon=1e-5),
                                [{"params": model.parameters()}])
    assert optimizer.param_groups[0]["weight_decay"] == 0.3 and optimizer.param_groups[0]["eps"] == 1e-5


def test_gradient_release_only_for_optimi():
    model, _, _ = _toy_problem()
    optimizer = build_optimizer(_settings("optimi-adamw", optimizer_release_gradients=True),
                                [{"params": model.parameters()}])
    assert optimizer.defaults["gradient_release"] is True
    with pytest.raises(ConfigError, match="optimi"):
        build_optimizer(_settings("adamw_bf16", optimizer_release_gradients=True), [{"params": model.parameters()}])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_optimizer(_settings("optimi-adamw", optimizer_release_gradients=True, gradient_accumulation_steps=2),
                        [{"params": model.parameters()}])


def test_unknown_optimizer_is_refused():
    with pytest.raises(ConfigError, match="adamw_bf16"):
        build_optimizer(Settings({"learning_rate": 1e-3}), [{"params": [torch.nn.Parameter(torch.ones(2))]}])


def test_prodigy_refuses_two_learning_rates():
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ConfigError, match="one learning rate"):
        build_optimizer(_settings("prodigy"), [{"params": [first]}, {"params": [second], "lr": 0.5}])


def test_prodigy_steps_freezes_the_step_size():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(256))
    optimizer = build_optimizer(_settings("prodigy", prodigy_steps=3), [{"params": [weight]}])
    estimates = []
    for _ in range(8):
        weight.pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        estimates.append(optimizer.param_groups[0]["d"])
    assert estimates[0] != estimates[2]  # still adapting
    assert len(set(estimates[2:])) == 1  # frozen from step 3 on


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    value = torch.full((20000,), 1.0 + 2**-10)  # a quarter of the way between two bf16 neighbours
    rounded = stochastic_round_to_bf16(value).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(rounded.mean().item() - value[0].item()) < 2e-4


def test_adamw_bf16_moves_bf16_weights_by_small_steps():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    optimizer = AdamWBF16([weight], lr=1e-3, weight_decay=0.0)
    for _ in range(20):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    # each step is -1e-3, far below bf16's spacing of 2**-7 at 1.0; nearest rounding would never move
    assert abs(weight.float().mean().item() - (1.0 - 20e-3)) < 2e-3
    state = optimizer.state_dict()
    reloaded = AdamWBF16([weight], lr=1e-3)
    reloaded.load_state_dict(state)
    assert reloaded.state[weight]["exp_avg_sq"].dtype == torch.float32


def _constant_gradient_run(name: str) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    optimizer = build_optimizer(_settings(name, learning_rate=1e-3), [{"params": [weight]}])
    for _ in range(40):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    optimizer_eval_mode(optimizer)
    return weight.detach().float()


def test_schedulefree_kahan_keeps_small_bf16_updates():
    reference = torch.nn.Parameter(torch.ones(64))
    optimizer = build_optimizer(_settings("adamw_schedulefree+no_kahan", learning_rate=1e-3),
                                [{"params": [reference]}])
    for _ in range(40):
        reference.grad = torch.ones_like(reference)
        optimizer.step()
    optimizer_eval_mode(optimizer)
    with_kahan = _constant_gradient_run("adamw_schedulefree")
    without = _constant_gradient_run("adamw_schedulefree+no_kahan")
    spacing = 2**-7
    assert (with_kahan - reference.detach()).abs().max() <= spacing
    assert (without - reference.detach()).abs().max() > spacing  # plain bf16 arithmetic drifts off


def test_train_and_eval_mode_round_trip():
    model, inputs, targets = _toy_problem()
    optimizer = build_optimizer(_settings("adamw_schedulefree"), [{"params": model.parameters()}])
    for _ in range(3):  # after one step the averaged and training points still coincide
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    training_point = model.weight.detach().clone()
    optimizer_eval_mode(optimizer)
    assert not torch.equal(model.weight, training_point)
    optimizer_train_mode(optimizer)
    torch.testing.assert_close(model.weight.detach(), training_point)
    plain = build_optimizer(_settings("optimi-adamw"), [{"params": model.parameters()}])
    optimizer_eval_mode(plain)  # no-op, must not fail


def test_missing_package_names_the_pip_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optimi", None)  # makes `import optimi` fail as if not installed
    with pytest.raises(ConfigError, match="pip install torch-optimi"):
        build_optimizer(_settings("optimi-adamw"), [{"params": [torch.nn.Parameter(torch.ones(2))]}])


def test_torchao_refuses_devices_it_cannot_compile_for():
    weight = torch.nn.Parameter(torch.ones(4, device="meta"))
    with pytest.raises(ConfigError, match="ao-adamw8bit runs on cpu, cuda, xpu.*meta"):
        build_optimizer(_settings("ao-adamw8bit"), [{"params": [weight]}])
