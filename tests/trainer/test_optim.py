import math

import torch

from pretune.recipe import TrainerConfig
from pretune.trainer.optim import build_optimizer, build_schedule, lr_factor, lr_log_keys, param_groups


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


def test_learning_rate_log_keys_name_each_group_by_the_module_it_trains():
    """``lr`` is the base rate; other rates are named by the module path their parameters share (minus the common prefix)."""
    model = torch.nn.ModuleDict({"model": torch.nn.ModuleDict({
        "encoder": torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]),
        "classifier": torch.nn.Linear(4, 2)})})
    named = list(model.named_parameters())
    scales = {"model.classifier.weight": 10.0, "model.classifier.bias": 10.0,
              "model.encoder.0.weight": 0.64, "model.encoder.0.bias": 0.64, "model.encoder.1.weight": 0.8, "model.encoder.1.bias": 0.8}
    groups = param_groups(named, 0.01, 1e-3, scales)
    keys = lr_log_keys(named, scales)
    assert len(keys) == len(groups)
    assert {k: g["lr"] for k, g in zip(keys, groups)} == {
        "lr_classifier": 1e-2, "lr_encoder.1": 8e-4, "lr_encoder.0": 6.4e-4}
    assert lr_log_keys(named, {**scales, "model.encoder.1.weight": 1.0, "model.encoder.1.bias": 1.0})[2:4] == ["lr", "lr"]
