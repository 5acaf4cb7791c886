"""The corpus pipeline for large runs (issue 17 part 7): the tokenisation cache never serves stale ids, and a
resumed run seeks to its position instead of replaying the batches before it."""

import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pretune.data.files import signature  # noqa: E402
from pretune.data.text import build_text_data  # noqa: E402
from pretune.recipe import DataConfig, Recipe  # noqa: E402
from pretune.tasks.base import Task  # noqa: E402
from pretune.trainer import checkpoint  # noqa: E402
from pretune.trainer.data import batch_order  # noqa: E402
from pretune.trainer.distributed import World  # noqa: E402
from pretune.trainer.loop import fit  # noqa: E402

datasets.disable_progress_bars()
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def paragraphs(first: str, count: int = 40) -> str:
    """``count`` blank-line separated documents; ``first`` starts the first one (same length for any 5-letter word)."""
    docs = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(count)]
    return "\n\n".join([f"{first} {docs[0]}", *docs[1:]]) + "\n"


@pytest.fixture
def corpus(tmp_path):
    """A text file and a tokenizer saved from it (so a rebuild tokenises with the very same tokenizer)."""
    path = tmp_path / "corpus.txt"
    path.write_text(paragraphs("alpha"), encoding="utf-8")
    tokenizer = build_text_data(DataConfig(files=str(path), cache_dir=str(tmp_path / "scratch"), validation=0, block_size=16,
                                           tokenizer={"vocab_size": 120}), family="encoder", nsp=False, seed=0).tokenizer
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return path


def config(tmp_path: Path, cache: str = "cache", **fields) -> DataConfig:
    tokenizer = fields.pop("tokenizer", {"path": str(tmp_path / "tokenizer")})
    return DataConfig(**{"files": str(tmp_path / "corpus.txt"), "cache_dir": str(tmp_path / cache), "validation": 0.2,
                         "block_size": 16, "tokenizer": tokenizer, **fields})


def blocks(cfg: DataConfig) -> tuple[list[list[int]], list[list[int]]]:
    data = build_text_data(cfg, family="encoder", nsp=False, seed=0)
    return list(data.train["input_ids"]), list(data.validation["input_ids"]) if data.validation is not None else []


def arrow_files(folder: Path) -> set[Path]:
    return set(folder.rglob("*.arrow"))


@pytest.mark.parametrize("streaming", [False, True])
def test_unchanged_inputs_reuse_the_cache(tmp_path, corpus, streaming):
    cfg = config(tmp_path, streaming=streaming)
    first = blocks(cfg)
    written = arrow_files(tmp_path / "cache")
    assert written  # the first run wrote its documents, ids and blocks to Arrow files
    assert blocks(cfg) == first
    assert arrow_files(tmp_path / "cache") == written  # the second run wrote nothing: every step was a cache hit


@pytest.mark.parametrize("streaming", [False, True])
def test_an_edit_keeping_size_and_mtime_is_tokenised_again(tmp_path, corpus, streaming):
    cfg = config(tmp_path, streaming=streaming)
    before = blocks(cfg)
    stat = os.stat(corpus)
    corpus.write_text(paragraphs("gamma"), encoding="utf-8")  # same size, other words
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # what `touch -r`, `cp -p` or an archive leave
    assert (os.stat(corpus).st_size, os.stat(corpus).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = blocks(cfg)
    fresh = blocks(config(tmp_path, cache="fresh-cache", streaming=streaming))
    assert after == fresh  # the ids of the file as it is now ...
    assert after != before  # ... not the cached ids of the file as it was


def test_the_signature_is_the_content_not_the_stats(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same size one\n")
    b.write_text("same size two\n")
    os.utime(b, ns=(os.stat(a).st_atime_ns, os.stat(a).st_mtime_ns))
    (_, size_a, hash_a), (_, size_b, hash_b) = signature([str(a), str(b)])
    assert size_a == size_b and hash_a != hash_b
    b.write_text("same size one\n")
    assert signature([str(b)])[0][2] == hash_a


@pytest.mark.parametrize("change", [
    {"block_size": 12},                      # the block size
    {"document": "file"},                    # a data option: how the file splits into documents
    {"max_documents": 10},                   # ... how many documents are read
    {"validation": 0.4},                     # ... which documents are held out
    {"tokenizer": {"vocab_size": 100}},      # another tokenizer (trained on the corpus, fewer words)
    {"tokenizer": {"vocab_size": 120, "lowercase": True}},
])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_changed_key_gives_the_ids_a_fresh_cache_gives(tmp_path, corpus, change, streaming):
    cfg = config(tmp_path, streaming=streaming)
    before = blocks(cfg)
    changed = cfg.model_copy(update={k: (DataConfig.model_validate({k: v}).tokenizer if k == "tokenizer" else v) for k, v in change.items()})
    after = blocks(changed)
    assert after == blocks(changed.model_copy(update={"cache_dir": str(tmp_path / "fresh-cache")}))
    assert after != before


# ---------------------------------------------------------------------------- resume seeks


class CountedRows:
    """Indexable like a ``datasets.Dataset``; remembers every row the loader fetched."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 4, generator=g), torch.randn(n, generator=g)
        self.fetched: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, indices):
        self.fetched.append(list(indices))
        return {"x": self.x[indices], "y": self.y[indices]}


class Regression(Task):
    losses = ("mse",)
    unit = "ex"

    def __init__(self):
        super().__init__(cfg=None)

    def build(self, backbone, data):
        return Model()

    def collate(self, rows, seeds):
        return {"x": rows["x"], "y": rows["y"]}

    def units(self, batch):
        return {"mse": torch.tensor(float(len(batch["x"])))}

    def save(self, module, path, data):
        safetensors.torch.save_model(module, str(Path(path) / "model.safetensors"))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch, phase=None):
        return {"mse": ((self.linear(batch["x"]).squeeze(1) - batch["y"]) ** 2).sum()}


def train(run_dir: Path, data: SimpleNamespace, resume_from: Path | None = None, **trainer) -> nn.Module:
    settings = {"optimizer": "sgd", "lr": 0.01, "warmup": 0, "batch_size": 4, "epochs": 1, "save_every": 1000, "log_every": 100,
                "progress": False, "tensorboard": False, "precision": "fp32", "fast_dropout": False, **trainer}
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe = Recipe.model_validate({"run_dir": str(run_dir), "trainer": settings})
    task = Regression()
    torch.manual_seed(0)
    module = task.build(None, data)
    if resume_from is not None:
        checkpoint.load_module(resume_from, module)
    fit(task, module, data, recipe, run_dir, World(), resume_from=resume_from)
    return module


def test_resume_at_90_percent_fetches_only_the_batches_after_its_position(tmp_path, monkeypatch):
    import pretune.trainer.loop as loop

    monkeypatch.setattr(loop, "measure_peak", lambda dtype, device: 1e12)  # no half-second GEMM measurement
    whole = SimpleNamespace(train=CountedRows(80), validation=None)  # 20 steps per epoch
    train(tmp_path / "whole", whole)
    first = SimpleNamespace(train=CountedRows(80), validation=None)
    train(tmp_path / "run", first, max_steps=18)  # stopped with a checkpoint at step 18: 90% of the epoch
    latest = checkpoint.latest_checkpoint(tmp_path / "run")
    assert int(latest.name.split("-")[1]) == 18
    resumed = SimpleNamespace(train=CountedRows(80), validation=None)
    train(tmp_path / "run", resumed, resume_from=latest)
    order = batch_order(80, 4, 0, 0)
    assert whole.train.fetched == order  # the uninterrupted run fetched the whole epoch, in order
    assert resumed.train.fetched == order[18:]  # the resumed one only the 2 batches after its position: nothing replayed
