"""The decisions the training loop takes on a GPU, checked on a CPU: which precision ``auto`` picks (bf16 on
tensor-core GPUs, fp16 with a gradient scaler on older ones), the fused optimizer, no CPU-only attention or
dropout on CUDA (so SDPA's flash / memory-efficient kernels run), pinned loader memory, NCCL with a gloo side
group, and ``torch.compile`` training like eager mode.  What needs a real GPU is ``benchmarks/gpu_check.sh``."""

import warnings

import pytest
import torch
import torch.distributed as dist
import transformers
from torch import nn

from pretune.recipe import TrainerConfig
from pretune.trainer import data as batching, distributed, fast
from pretune.trainer.distributed import World
from pretune.trainer.optim import build_optimizer, param_groups
from pretune.trainer.precision import DTYPES, autocast, resolve
from test_loop import LinearTask, no_peak_measurement, recipe, regression_data, run  # noqa: F401  (same folder; its autouse fixture too)

CUDA = torch.device("cuda", 0)


def fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """A CUDA device of this compute capability, as far as pretune's decisions look (no ROCm)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # what torch says even on a T4
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 9), "bf16"),
                                                  ((7, 5), "fp16"), ((7, 0), "fp16")], ids=["H100", "A100", "L4", "T4", "V100"])
def test_auto_precision_on_cuda_is_bf16_on_tensor_core_gpus_else_fp16(monkeypatch, capability, expected):
    fake_gpu(monkeypatch, capability)
    assert resolve("auto", CUDA) == expected
    assert resolve("fp32", CUDA) == "fp32" and resolve("bf16", CUDA) == "bf16"  # an explicit choice is kept


def test_autocast_on_cuda_uses_the_precision_dtype():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast": only its settings are checked
        for precision in ("bf16", "fp16"):
            context = autocast(precision, CUDA)
            assert (context.device, context.fast_dtype) == ("cuda", DTYPES[precision])
    assert not isinstance(autocast("fp32", CUDA), torch.autocast)


@pytest.mark.parametrize("precision, scaled", [("fp16", True), ("bf16", False), ("fp32", False)])
def test_only_fp16_scales_the_loss_and_a_scaled_run_trains(tmp_path, precision, scaled):
    """The loop's rule (a GradScaler for fp16 only) is the same line on every device; here it runs on the CPU.
    fp16's first steps overflow at the initial scale 2^16 and are skipped by the scaler, which backs off."""
    from pretune.trainer.loop import Trainer

    task, data = LinearTask(freeze_first_epoch=False), regression_data()
    torch.manual_seed(0)
    module = task.build(None, data)
    trainer = Trainer(task, module, recipe(tmp_path, precision=precision, optimizer="adamw"), World(), total_steps=20)
    assert trainer.scaler.is_enabled() is scaled
    before = [p.detach().clone() for p in module.parameters()]
    trainer.start_epoch(0)
    for step in range(20):
        out = trainer.step([task.collate(data.train[list(range(8 * (step % 8), 8 * (step % 8) + 8))], [])], step)
    assert not out.skipped and all(torch.isfinite(g) for g in out.grad_norms.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert not scaled or trainer.scaler.get_scale() < 2.0**16


def test_adam_and_adamw_are_fused_on_cuda_and_take_a_scaled_step():
    model = nn.Linear(4, 2)
    for name in ("adamw", "adam"):
        cfg = TrainerConfig(optimizer=name)
        optimizer = build_optimizer(param_groups(model.named_parameters(), 0.01, 1e-3), cfg, CUDA)
        assert optimizer.defaults["fused"] is True and not optimizer.defaults.get("foreach")
        assert optimizer._step_supports_amp_scaling  # fp16's GradScaler hands it the scale instead of unscaling first
    sgd = build_optimizer(param_groups(model.named_parameters(), 0.0, 1e-2), TrainerConfig(optimizer="sgd"), CUDA)
    assert sgd.defaults["foreach"] is True


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return transformers.BertForMaskedLM(config)


def test_the_cpu_dropout_and_attention_are_not_installed_on_cuda():
    model = tiny_bert()
    fast.speed_up(model, CUDA)
    assert sum(type(m) is nn.Dropout for m in model.modules()) == 2 * 3 + 1 and not any(isinstance(m, fast.FastDropout) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"  # Transformers' SDPA: flash / memory-efficient kernels on a GPU
    fast.speed_up(model, torch.device("cpu"))
    assert model.config._attn_implementation == "pretune"  # the CPU replacement, for contrast


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_packed_pretraining_batches_reach_sdpa_without_a_mask_so_a_gpu_can_run_flash_attention(monkeypatch, family):
    """Packed MLM / CLM blocks carry no attention mask: SDPA gets ``attn_mask=None`` (with ``is_causal`` for GPT-2),
    the condition for its flash kernel on a GPU, where dropout inside the kernel is allowed."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: seen.append(kwargs) or sdpa(*args, **kwargs))
    if family == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
        model = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")  # as pretune's backbones build it
    else:
        config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    fast.speed_up(model, CUDA).train()
    model(input_ids=torch.randint(0, 50, (2, 12)))
    assert len(seen) == 2 and all(call["attn_mask"] is None and call["dropout_p"] == 0.1 for call in seen)
    assert all(call["is_causal"] is (family == "gpt2") for call in seen)


def test_the_pretune_attention_hands_non_cpu_tensors_to_sdpa_unchanged(monkeypatch):
    """A model switched to the ``pretune`` attention on a CPU and then moved to a GPU still runs SDPA there."""
    import transformers.integrations.sdpa_attention as sdpa

    calls = []
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *args, **kwargs: calls.append(kwargs) or ("sdpa", None))
    q = k = v = torch.empty(2, 2, 8, 4, device="meta")  # any device but the CPU
    module = nn.Module()
    module.is_causal = False
    assert fast.attention(module, q, k, v, None, dropout=0.1)[0] == "sdpa"
    assert calls[0]["dropout"] == 0.1
    assert fast.fast_dropout(torch.ones(4, device="meta"), 0.5).device.type == "meta"  # torch's own dropout off the CPU


def test_the_loader_pins_memory_when_asked():
    """The loop asks for pinned batches when the device is CUDA (``pin=world.device.type == "cuda"``), so the
    step's ``.to(device, non_blocking=True)`` copies overlap with compute."""
    data = regression_data(n_train=16, n_validation=0)
    order = batching.batch_order(16, 4, seed=0, epoch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no accelerator is found": nothing to pin into on this machine
        pinned = batching.loader(data.train, LinearTask(), order, 0, 0, workers=0, pin=True)
        assert pinned.pin_memory is True and len(list(pinned)) == 4
    assert batching.loader(data.train, LinearTask(), order, 0, 0, workers=0, pin=False).pin_memory is False


@pytest.mark.parametrize("gpu", [True, False], ids=["cuda-nccl", "cpu-gloo"])
def test_init_picks_this_ranks_gpu_and_nccl_with_a_gloo_group_for_monitored_barriers(monkeypatch, gpu):
    for name in ("_monitor_group", "_timeout_s", "_timeout_setting"):  # module state init sets: restored after the test
        if hasattr(distributed, name):
            monkeypatch.setattr(distributed, name, getattr(distributed, name))
    calls: dict[str, list] = {"init": [], "group": [], "device": []}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["device"].append(device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: calls["init"].append(backend))
    monkeypatch.setattr(dist, "new_group", lambda backend=None, **kwargs: calls["group"].append(backend) or "side group")
    monkeypatch.setattr(dist, "monitored_barrier", lambda group=None, **kwargs: calls.setdefault("barrier", []).append(group))
    world = distributed.init(timeout_s=5)
    if gpu:
        assert world.device == torch.device("cuda", 1) and calls["device"] == [torch.device("cuda", 1)]
        assert calls["init"] == ["nccl"] and calls["group"] == ["gloo"] and calls["barrier"] == ["side group"]
    else:
        assert world.device == torch.device("cpu") and calls["device"] == [] and calls["init"] == ["gloo"]
    assert (world.rank, world.size, world.distributed) == (1, 2, True)


def test_compile_trains_a_tiny_model_like_eager_mode(tmp_path):
    """trainer.compile=true wraps the (DDP-)module in torch.compile; the compiled run reaches the same weights (~30 s:
    Inductor compiles C++ kernels on the CPU, Triton kernels on a GPU)."""
    _, eager = run(tmp_path / "eager", LinearTask(freeze_first_epoch=False), max_steps=4, eval_every=100)
    _, compiled = run(tmp_path / "compiled", LinearTask(freeze_first_epoch=False), max_steps=4, eval_every=100, compile=True)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-5, atol=1e-6)  # fused kernels: rounding only
