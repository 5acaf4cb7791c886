from pretune.trainer.data import batch_order, eval_order, mix


def test_global_batch_is_the_same_whatever_the_world_size():
    single = batch_order(103, 8, seed=1, epoch=2)
    ranks = [batch_order(103, 4, seed=1, epoch=2, rank=r, world=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 12
    for step, big in enumerate(single):
        assert sorted(big) == sorted(ranks[0][step] + ranks[1][step])


def test_order_depends_on_seed_and_epoch_only():
    assert batch_order(50, 5, 0, 0) == batch_order(50, 5, 0, 0)
    assert batch_order(50, 5, 0, 0) != batch_order(50, 5, 0, 1)
    assert batch_order(50, 5, 0, 0) != batch_order(50, 5, 1, 0)


def test_eval_covers_everything_once():
    got = sorted(i for r in range(3) for b in eval_order(23, 4, r, 3) for i in b)
    assert got == list(range(23))


def test_mix_is_stable_and_spreads():
    assert mix(1, 2, 3) == mix(1, 2, 3)
    assert len({mix(0, 0, i) for i in range(1000)}) == 1000
    assert 0 <= mix(2**70, -5) < 2**63
