"""Evaluation maths that tasks import: metrics as pure functions on arrays and lists (``metrics``) and
weighted k-NN accuracy of features (``knn``).  Leaf modules: they import no other pretune module."""
