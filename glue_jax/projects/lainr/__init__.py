"""LA-INR (locality-aware generalizable implicit neural representation) jobs.

``tasks.run(config, workdir)`` is the entry for ``config.kind == 'lainr'``;
``config.task`` picks the job:
  'reconstruct'  encoder + INR trained with MSE on images (``reconstruction``);
  'nvs'          few-shot novel view synthesis by volume rendering (``novel_views``);
  'generate'     a SiT over the R latent tokens of a trained reconstruction
                 model, decoded by the INR at any resolution (``generation``).
Every task trains with the one trainer (``glue_jax.train.trainer``):
data-parallel over all devices, resumable with its data position.
"""
