"""Learning-rate schedules of the training commands (app.train.schedule), alone."""

from __future__ import annotations

import itertools

import pytest
import torch

from app.train.schedule import warmup_cosine_to_floor, warmup_cosine_to_zero


def test_warmup_then_cosine_to_the_floor() -> None:
    f = warmup_cosine_to_floor(warmup=4, total=14, floor=0.1)
    assert [f(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)  # the cosine starts at the peak
    assert f(9) == pytest.approx(0.55)  # half way: floor + (1 - floor) / 2
    assert f(14) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)  # stays at the floor
    after = [f(i) for i in range(4, 15)]
    assert all(a >= b for a, b in itertools.pairwise(after))


def test_warmup_longer_than_the_run_and_a_zero_floor() -> None:
    f = warmup_cosine_to_floor(warmup=10, total=5, floor=0.0)
    assert f(4) == pytest.approx(0.5) and f(10) == pytest.approx(1.0) and f(11) == pytest.approx(0.0)


def test_warmup_over_five_percent_then_cosine_to_zero() -> None:
    f = warmup_cosine_to_zero(100)
    assert f(0) == pytest.approx(0.2 * 0.5 * (1 + 1.0))  # warm-up 5 steps, cosine still 1
    assert f(4) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.04 * torch.pi)).item()))
    assert f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0) and f(200) == pytest.approx(0.0)
    assert warmup_cosine_to_zero(3)(0) == pytest.approx(1.0)  # fewer than 20 steps: a one-step warm-up


def test_a_lambda_lr_follows_the_multiplier() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_to_floor(2, 6))
    seen = []
    for _ in range(7):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    f = warmup_cosine_to_floor(2, 6)
    assert seen == pytest.approx([0.5 * f(i) for i in range(7)])
