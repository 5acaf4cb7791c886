import torch

from pretune.evaluate.knn import knn_accuracy, knn_predict


def test_weighted_vote_on_known_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_predict(bank, labels, queries, num_classes=2, k=3).tolist() == [0, 1]
    # k = 5: every neighbour votes, weighted by exp(cos / 0.1): the two close class-0 points win
    assert knn_predict(bank, labels, queries[:1], num_classes=2, k=5).tolist() == [0]


def test_temperature_weighting_changes_the_vote():
    # one very close neighbour of class 0 against two farther ones of class 1
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(bank, labels, query, 2, k=3, temperature=0.1).item() == 0  # e^10 > 2 e^6
    assert knn_predict(bank, labels, query, 2, k=3, temperature=10.0).item() == 1  # nearly a plain majority


def test_accuracy_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 8, generator=g), torch.randn(10, 8, generator=g)
    labels, qlabels = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (10,), generator=g)
    assert knn_accuracy(bank, labels, queries, qlabels, 3) == knn_accuracy(5 * bank, labels, 0.1 * queries, qlabels, 3)
