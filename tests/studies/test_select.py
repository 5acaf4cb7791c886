"""``pretune select`` (TypiClust): k-means and typicality on known geometry, one typical pick per cluster,
determinism, and the command on a real text pool with a pretune encoder."""

from __future__ import annotations

import csv

import pytest
import torch

from pretune.cli import main
from pretune.errors import DataError
from pretune.select import kmeans, nearest_documents, typicality, typiclust


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three tight blobs of 30, 20 and 10 points far apart, plus one far outlier (row 60)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([centres[i] + 0.3 * torch.randn(n, 2, generator=generator) for i, n in enumerate((30, 20, 10))])
    return torch.cat([x, torch.tensor([[30.0, 30.0]])]), torch.tensor([0] * 30 + [1] * 20 + [2] * 10 + [3])


def test_kmeans_separates_the_blobs():
    x, truth = blobs()
    assign = kmeans(x[:60], 3)
    for blob in range(3):
        assert len(set(assign[truth[:60] == blob].tolist())) == 1
    assert len(set(assign.tolist())) == 3


def test_typicality_is_highest_at_the_dense_centre():
    x = torch.cat([torch.zeros(1, 2), torch.tensor([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.1], [0.0, -0.1], [5.0, 5.0]])])
    scores = typicality(x, neighbours=3)
    assert int(scores.argmax()) == 0 and int(scores.argmin()) == 5
    assert scores[0] == pytest.approx(1 / 0.1)  # its 3 nearest are all 0.1 away


def test_typiclust_picks_one_typical_example_per_cluster_largest_first_and_outliers_last():
    x, truth = blobs()
    assert [int(truth[row]) for row, _ in typiclust(x, 4)] == [0, 1, 2, 3]  # the outlier's cluster is under 5: last
    x, truth = x[:60], truth[:60]
    picked = typiclust(x, 3)
    assert [int(truth[row]) for row, _ in picked] == [0, 1, 2]  # largest cluster first
    for row, _ in picked:  # the pick is its blob's most typical member
        members = torch.nonzero(truth == truth[row]).squeeze(1)
        assert row == int(members[typicality(x[members]).argmax()])
    assert typiclust(x, 3) == picked  # deterministic
    with pytest.raises(DataError, match="--budget 0"):
        typiclust(x, 0)


def test_select_command_on_a_text_pool(tmp_path, tiny_encoder, topics):
    out = tmp_path / "to_label.csv"
    assert main(["select", str(tiny_encoder), str(topics / "train.csv"), "--budget", "8", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out, newline="")))
    pool = list(csv.DictReader(open(topics / "train.csv", newline="")))
    assert len(rows) == 8 and len({r["pool_row"] for r in rows}) == 8
    assert all(pool[int(r["pool_row"])]["text"] == r["text"] for r in rows)  # the pool's rows, unchanged
    again = tmp_path / "again.csv"
    assert main(["select", str(tiny_encoder), str(topics / "train.csv"), "--budget", "8", "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()


def test_select_command_on_an_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from pretune.data.images import load_digits
    from pretune.recipe import load_recipe
    from pretune.run import train

    run = train(load_recipe("recipes/image-classify.yaml", [
        f"run_dir={tmp_path / 'run'}", "trainer.progress=false", "trainer.tensorboard=false", "trainer.precision=fp32",
        "trainer.threads=1", "trainer.max_steps=5", "trainer.eval_every=5", "backbone.size=tiny", "data.size=8"]), overwrite=True)
    x, keys = load_digits()
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(30):
        Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8), mode="L").save(pool / f"{i:02d}.png")
    out = tmp_path / "picked.jsonl"
    assert main(["select", str(run.model_dir), str(pool), "--budget", "5", "--out", str(out)]) == 0
    picked = [__import__("json").loads(line) for line in out.read_text().splitlines()]
    assert len(picked) == 5 and all(p["path"].startswith(str(pool)) and p["typicality"] > 0 for p in picked)


# -- kNN-TAPT: the pool documents nearest to the task's texts ---------------------------------------------
def test_nearest_documents_takes_each_task_texts_neighbours_in_turn():
    pool = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    task = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    picked = nearest_documents(pool, task, 4)
    # round-robin: task 0's nearest (row 0), task 1's nearest (row 3), then each one's second (rows 1, 4)
    assert [row for row, _ in picked] == [0, 3, 1, 4]
    assert picked[0][1] == pytest.approx(1.0)
    assert nearest_documents(pool, task, 4) == picked  # deterministic
    assert [row for row, _ in nearest_documents(pool, task, 6)][-1] == 5  # the farthest comes last
    with pytest.raises(DataError, match="data.select.documents"):
        nearest_documents(pool, task, 7)


def test_nearest_documents_skips_a_document_two_task_texts_share():
    pool = torch.tensor([[1.0, 0.0], [0.7, 0.7], [0.0, 1.0]])
    task = torch.tensor([[1.0, 0.05], [1.0, -0.05]])  # both nearest to row 0
    assert [row for row, _ in nearest_documents(pool, task, 2)] == [0, 1]
