"""Studies over many runs: label efficiency (pretrained vs scratch) and hyperparameter search."""
