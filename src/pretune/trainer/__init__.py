"""The one trainer: :func:`pretune.trainer.loop.fit` runs any task on any backbone."""
