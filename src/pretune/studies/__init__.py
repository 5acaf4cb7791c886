"""The top floor: studies over many runs (label efficiency, pretrained vs scratch; hyperparameter
search) and the reports that draw runs and studies from their files."""
