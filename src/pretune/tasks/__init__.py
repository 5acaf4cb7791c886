"""Tasks: what turns a batch into a loss.

A task is a small object registered by name in :data:`pretune.registry.TASKS`:

- ``Config``: its pydantic recipe section (``task: {name: mlm, mask_prob: 0.15}``);
- ``data(data_cfg, seed)``: the train / validation datasets and tokenizer or transform;
- ``build(backbone_cfg, data)``: the ``nn.Module`` to train.  Its ``forward(batch)`` returns a
  dict of **summed** per-unit values (e.g. ``{"mlm": sum of token losses, "mlm_correct": ...}``);
- ``collate(examples)``: a batch of tensors (masking, views and corruption happen here, from each
  example's own ``seed``, so results do not depend on batch size, worker count or world size);
- ``units(batch)``: how many units each summed value counts (masked tokens, examples...).  The
  trainer divides every sum by its unit count over the whole accumulation window and all ranks,
  so gradient accumulation and DDP give the same gradient as one large batch;
- ``losses``: the keys of ``forward``'s output that add up to the training loss;
- ``save(module, path, data)``: write ``model/`` as a standard Hugging Face folder (or similar).

Optional: ``phases`` (one optimizer per phase: ``{"discriminator": ("d_real", "d_fake"), ...}``,
the module's ``forward(batch, phase)`` and ``phase_parameters(phase)``), ``probe`` (extra
validation metrics such as k-NN accuracy), ``prepare`` (cached features), ``score`` (metrics over
the whole validation set), ``monitor`` (the metric that picks the best checkpoint).
"""

from pretune.tasks import autoencoder, clm, contrastive, finetune, gan, mlm, simcse, supervised  # noqa: F401  (registers the tasks)
