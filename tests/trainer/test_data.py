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


def test_replay_share_is_exact_in_every_micro_batch_and_the_domain_rows_define_the_epoch():
    domain, general, batch = 100, 37, 8
    replay = (general, 0.25)  # 2 of every 8 rows
    order = batch_order(domain + general, batch, seed=3, epoch=1, replay=replay)
    assert len(order) == domain // 6  # 6 domain rows per batch; the tail is dropped
    seen = []
    for rows in order:
        assert len(rows) == batch
        assert sum(row >= domain for row in rows) == 2
        seen += [row for row in rows if row < domain]
    assert len(set(seen)) == len(seen)  # each domain row at most once per epoch
    assert order == batch_order(domain + general, batch, seed=3, epoch=1, replay=replay)
    replayed = [row for rows in order for row in rows if row >= domain]
    assert len(replayed) == 32 and len(set(replayed)) == 32  # a seeded permutation of the general rows: no repeat before all are used
    longer = batch_order(domain + general, batch, seed=3, epoch=1, replay=(general, 0.5))  # 4 per batch: 100 draws cycle
    replayed = [row for rows in longer for row in rows if row >= domain]
    assert set(replayed) == set(range(domain, domain + general)) and replayed[:general] == replayed[general:2 * general]


def test_replay_over_ranks_is_the_single_process_order_dealt_out():
    domain, general = 96, 50
    single = batch_order(domain + general, 8, seed=0, epoch=0, replay=(general, 0.5))
    ranks = [batch_order(domain + general, 4, seed=0, epoch=0, rank=r, world=2, replay=(general, 0.5)) for r in range(2)]
    for rows in ranks[0] + ranks[1]:
        assert sum(row >= domain for row in rows) == 2
    # each global step holds the same rows whatever the split into processes
    for step, rows in enumerate(single):
        assert sorted(rows) == sorted(ranks[0][step] + ranks[1][step])


def _lengths(n, seed=0):
    import random
    rng = random.Random(seed)
    return [rng.randint(1, 500) for _ in range(n)]


def test_length_groups_train_on_the_same_examples_each_epoch_with_little_padding():
    from pretune.trainer import data as batching
    n, batch, lengths = 1000, 8, _lengths(1000)
    for epoch in range(3):
        plain = batch_order(n, batch, seed=1, epoch=epoch)
        grouped = batch_order(n, batch, seed=1, epoch=epoch, lengths=lengths)
        assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)  # only the order changes
        assert all(len(b) == batch for b in grouped)
        padded = lambda batches: sum(max(lengths[i] for i in b) * len(b) for b in batches)  # noqa: E731
        assert padded(grouped) < 0.6 * padded(plain)  # 50-batch windows sorted: most padding gone
        # batches are shuffled across the epoch, not sorted from short to long
        first = [max(lengths[i] for i in b) for b in grouped]
        assert first != sorted(first) and first != sorted(first, reverse=True)
    assert batch_order(n, batch, 1, 0, lengths=lengths) == batch_order(n, batch, 1, 0, lengths=lengths)  # resume-exact
    assert batch_order(n, batch, 1, 0, lengths=lengths) != batch_order(n, batch, 1, 1, lengths=lengths)
    assert batch_order(n, batch, 1, 0, lengths=lengths) != batch_order(n, batch, 2, 0, lengths=lengths)
    # windows hold GROUP_WINDOW global batches: a sorted window's batches never mix rows of two windows
    window = batching.GROUP_WINDOW * batch
    order = batching.torch.randperm(n, generator=batching.torch.Generator().manual_seed(mix(1, 0))).tolist()
    windows = {i: w for w in range(0, n, window) for i in order[w:w + window]}
    assert all(len({windows[i] for i in b}) == 1 for b in batch_order(n, batch, 1, 0, lengths=lengths))


def test_length_grouped_global_batch_is_the_same_whatever_the_world_size():
    n, lengths = 203, _lengths(203, seed=3)
    single = batch_order(n, 8, seed=5, epoch=2, lengths=lengths)
    ranks = [batch_order(n, 4, seed=5, epoch=2, rank=r, world=2, lengths=lengths) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    for step, rows in enumerate(single):
        assert sorted(rows) == sorted(ranks[0][step] + ranks[1][step])
