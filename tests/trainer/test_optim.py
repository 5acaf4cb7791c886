import math

import torch

from pretune.recipe import TrainerConfig
from pretune.trainer.optim import build_optimizer, build_schedule, lr_factor, param_groups


def test_warmup_then_cosine_to_min():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == 0.1
    assert lr_factor(9, 100, 10, "cosine", 0.0) == 1.0
    assert math.isclose(lr_factor(55, 100, 10, "cosine", 0.0), 0.5)
    assert math.isclose(lr_factor(100, 100, 10, "cosine", 0.1), 0.1)


def test_linear_and_constant():
    assert math.isclose(lr_factor(55, 100, 10, "linear", 0.0), 0.5)
    assert lr_factor(80, 100, 10, "constant", 0.0) == 1.0


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model.named_parameters(), 0.1, 1e-3)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[1]["weight_decay"] == 0.0


def test_scheduler_state_is_weights_only_safe(tmp_path):
    model = torch.nn.Linear(4, 4)
    cfg = TrainerConfig()
    opt = build_optimizer(param_groups(model.named_parameters(), 0.01, 1e-3), cfg, torch.device("cpu"))
    sched = build_schedule(opt, cfg, 100)
    for _ in range(3):
        opt.step()
        sched.step()
    torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert loaded["s"]["last_epoch"] == 3
