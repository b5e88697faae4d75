"""The weights' moving average (train.ema_decay): its update rule, the swap around validation, its checkpoint."""

import torch

from mrtune.train.ema import averaged_weights, update_ema


def _optimizer(value: float):
    weight = torch.nn.Parameter(torch.full((3,), value))
    return weight, torch.optim.AdamW([weight], lr=0.1)


def test_the_average_warms_up_then_decays_at_the_rate_asked_for():
    weight, optimizer = _optimizer(0.0)
    update_ema(optimizer, 0.9)  # the first update starts the average at the weights
    assert torch.equal(optimizer.state[weight]["ema"], weight.detach())
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0] * 10, start=1):
        with torch.no_grad():
            weight.fill_(value)
        update_ema(optimizer, 0.9)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
        assert torch.allclose(optimizer.state[weight]["ema"], torch.full((3,), expected)), n
    assert optimizer.state[weight]["ema_updates"] == 40


def test_averaged_weights_swap_in_and_back_even_on_error():
    weight, optimizer = _optimizer(1.0)
    update_ema(optimizer, 0.9)
    with torch.no_grad():
        weight.fill_(5.0)
    try:
        with averaged_weights(optimizer, True):
            assert torch.equal(weight.detach(), torch.ones(3))
            raise KeyError("a failed validation")
    except KeyError:
        pass
    assert torch.equal(weight.detach(), torch.full((3,), 5.0))
    with averaged_weights(optimizer, False):
        assert torch.equal(weight.detach(), torch.full((3,), 5.0))


def test_the_average_travels_with_the_optimizer_state():
    weight, optimizer = _optimizer(1.0)
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            weight.fill_(value)
        optimizer.zero_grad()
        weight.sum().backward()
        optimizer.step()
        update_ema(optimizer, 0.5)
    copy, restored = _optimizer(0.0)
    restored.load_state_dict(optimizer.state_dict())
    assert torch.equal(restored.state[copy]["ema"], optimizer.state[weight]["ema"])
    assert restored.state[copy]["ema_updates"] == 2
