"""Tasks: what turns a batch into a loss (the interface is :class:`pretune.tasks.base.Task`).

Pretraining objectives: ``mlm`` (+ NSP), ``clm``, ``simcse`` on text; ``simclr``, ``autoencoder``,
``gan`` on images and vectors (``simclr`` and ``autoencoder`` also on audio spectrograms); ``best-rq``
(masked spectrogram modelling) on audio.  Fine-tuning: ``classify``, ``regress``, ``tag`` on any modality
(:mod:`pretune.tasks.finetune` with the head kinds of :mod:`pretune.heads`).
"""

from pretune.tasks import autoencoder, clm, contrastive, finetune, gan, masked_audio, mlm, simcse, two_tower  # noqa: F401  (registers the tasks)
