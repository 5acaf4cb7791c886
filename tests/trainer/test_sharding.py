"""trainer.distributed=fsdp in one process (a gloo group of one): every task, backbone family and strategy
trains through FSDP2 exactly as without it, and saves the same standard folder.  The two-process runs
(real sharding, re-sharding checkpoints) are in tests/integration/test_fsdp.py."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from pretune.errors import RecipeError
from pretune.recipe import load_recipe
from pretune.run import train
from pretune.trainer import sharding
from tests.test_contracts import CASE_IDS, QUIET, cases, family_recipe, folders  # noqa: F401  (folders: a fixture)

SHORT = ["trainer.max_steps=3", "trainer.eval_every=3", "trainer.eval_batches=1", "trainer.log_every=1", "trainer.batch_size=8"]


@pytest.fixture
def group(tmp_path):
    """A process group of one (what torchrun --nproc_per_node 1 gives), destroyed by the run's shutdown."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted((run_dir / "model").rglob("*.safetensors")):
        found.update({f"{file.name}:{k}": v for k, v in load_file(str(file)).items()})
    assert found, f"no weights in {run_dir / 'model'}"
    return found


def run(recipe_file: str, overrides: list[str], run_dir: Path) -> dict[str, torch.Tensor]:
    train(load_recipe(f"recipes/{recipe_file}", [*overrides, *QUIET, *SHORT, f"run_dir={run_dir}"]))
    return model_weights(run_dir)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"{name} differs")


# a tied embedding, a decoder, a CNN with batch norm and a k-NN probe, items, BEST-RQ, Whisper's layers
SHARDED_CASES = ["mlm/hf", "clm/hf-llama", "simclr/builtin-cnn", "two-tower/items", "best-rq/audio", "classify/audio-whisper"]


@pytest.mark.parametrize("case", [c if c in SHARDED_CASES else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASE_IDS if not c.startswith("gan")])
def test_every_task_trains_sharded_as_unsharded(case, folders, group, tmp_path):
    _, recipe_file, overrides = next(c for c in cases(folders) if c[0] == case)
    sharded = run(recipe_file, [*overrides, "trainer.distributed=fsdp"], tmp_path / "fsdp")
    plain = run(recipe_file, overrides, tmp_path / "plain")
    assert_same(plain, sharded)
    assert sharding.has_shards(tmp_path / "fsdp" / "checkpoints" / "step-00000003")


@pytest.mark.parametrize("strategy", ["freeze-bottom:1", "gradual-unfreeze", "llrd:0.5", "lora:r=2"])
@pytest.mark.parametrize("family", ["hf", "audio"])
def test_every_strategy_trains_sharded_as_unsharded(strategy, family, folders, group, tmp_path):
    if family == "audio" and strategy != "lora:r=2":
        pytest.skip("the strategies' bookkeeping is family-independent; audio adds LoRA on Whisper's layers")
    recipe_file, overrides = family_recipe(family, folders)
    overrides = [*overrides, f"strategy={strategy}", "task.cache_features=false", "trainer.epochs=3", "trainer.max_steps=null",
                 "trainer.min_steps=null"]
    sharded = run(recipe_file, [*overrides, "trainer.distributed=fsdp"], tmp_path / "fsdp")
    plain = run(recipe_file, overrides, tmp_path / "plain")
    assert_same(plain, sharded)


def test_what_cannot_train_sharded_is_refused_in_one_line(folders, group, tmp_path):
    recipe_file, overrides = family_recipe("hf", folders)
    with pytest.raises(RecipeError, match=r"trainer.distributed.*linear-probe"):
        run(recipe_file, [*overrides, "strategy=linear-probe", "trainer.distributed=fsdp"], tmp_path / "probe")
    _, recipe_file, overrides = next(c for c in cases(folders) if c[0] == "gan/builtin-cnn")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)  # the failed run shut the first
    with pytest.raises(RecipeError, match=r"trainer.distributed.*GAN"):
        run(recipe_file, [*overrides, "trainer.distributed=fsdp"], tmp_path / "gan")


def test_blocks_are_the_repeated_layers_and_never_split_a_tied_weight():
    import transformers

    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                                                intermediate_size=32))
    found = sharding.blocks(bert)
    assert [type(b).__name__ for b in found] == ["BertLayer"] * 3  # BertEmbeddings holds the decoder's tied weight: left to the root
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3)), nn.Flatten(), nn.Linear(8, 2))
    assert sharding.blocks(cnn) == [cnn[0], cnn[1], cnn[3]]  # the largest Sequential's parameterised children


def test_gathered_copy_holds_no_weights_between_saves():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied
    gathered = sharding.Gathered(model, main=True)
    assert all(p.is_meta for p in gathered.copy.parameters())
    assert gathered.copy[1].weight is gathered.copy[0].weight


def test_activation_checkpointing_recomputes_the_same_gradients(folders, group, tmp_path):
    """trainer.activation_checkpointing (with dropout on: the recomputation replays the same masks)."""
    _, recipe_file, overrides = next(c for c in cases(folders) if c[0] == "mlm/hf")
    sharded = run(recipe_file, [*overrides, "trainer.distributed=fsdp", "trainer.activation_checkpointing=true"], tmp_path / "fsdp")
    plain = run(recipe_file, overrides, tmp_path / "plain")
    assert_same(plain, sharded)
