"""Checkpoints, resume and the loss log of the training commands (app.train.common), alone."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from app.train.common import LossLog, latest_checkpoint, restore_scratch, resume_state, save_checkpoint
from app.train.schedule import warmup_cosine_to_floor


def test_checkpoints_are_numbered_atomic_and_only_the_newest_kept(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 10, 3):
        path = save_checkpoint(tmp_path, step, {"step": step}, keep=2)
        assert path.name == f"step-{step:06d}.pt"
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000003.pt", "step-000010.pt"]  # the newest two by step, no .tmp left behind
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000010.pt"


def test_resume_state_reads_latest_or_a_named_file(tmp_path: Path) -> None:
    assert resume_state(tmp_path, None) is None and resume_state(tmp_path, "latest") is None
    save_checkpoint(tmp_path, 4, {"step": 4, "np_rng": np.random.default_rng(1)})
    named = save_checkpoint(tmp_path, 5, {"step": 5})
    st = resume_state(tmp_path, "latest")
    assert st is not None and st["step"] == 5
    old = resume_state(tmp_path, str(named.with_name("step-000004.pt")))
    assert old is not None and old["np_rng"].integers(1000) == np.random.default_rng(1).integers(1000)


def _run(steps: int, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
         rng: np.random.Generator) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.from_numpy(rng.standard_normal((4, 3)).astype(np.float32)) + 0.01 * torch.randn(4, 3)
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine_to_floor(2, 8))


def test_an_interrupted_run_resumes_exactly_where_it_stopped(tmp_path: Path) -> None:
    model, opt, sched = _fresh()
    rng = np.random.default_rng(0)
    straight = _run(6, model, opt, sched, rng)
    # the same run, stopped after 3 steps and checkpointed as the from-scratch stages do
    model, opt, sched = _fresh()
    rng = np.random.default_rng(0)
    first = _run(3, model, opt, sched, rng)
    save_checkpoint(tmp_path, 3, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                                  "step": 3, "best": 0.5, "elapsed": 12.0, "np_rng": rng,
                                  "torch_rng": torch.get_rng_state()})
    model, opt, sched = _fresh()
    st = resume_state(tmp_path, "latest")
    assert st is not None
    start, best, elapsed, rng = restore_scratch(st, model, opt, sched)
    assert (start, best, elapsed) == (3, 0.5, 12.0)
    assert sched.last_epoch == 3
    assert first + _run(3, model, opt, sched, rng) == pytest.approx(straight, rel=1e-6)


def test_the_loss_log_appends_across_invocations_and_draws_a_plot(tmp_path: Path) -> None:
    log = LossLog(tmp_path)
    log.row(1, 0.5, 1e-3, 1.0)
    log.row(2, 0.25, 1e-3, 2.0, "val_psnr_db", "20.0000")
    log.fh.close()
    log = LossLog(tmp_path)  # a resumed run: no second header
    log.row(3, 0.125, 5e-4, 3.0)
    log.plot()
    log.fh.close()
    with open(tmp_path / "loss.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["step", "loss", "lr", "elapsed_s", "val_name", "val_value"]
    assert rows[1:] == [["1", "0.500000", "1.000e-03", "1.0", "", ""],
                        ["2", "0.250000", "1.000e-03", "2.0", "val_psnr_db", "20.0000"],
                        ["3", "0.125000", "5.000e-04", "3.0", "", ""]]
    assert (tmp_path / "loss.png").stat().st_size > 0
