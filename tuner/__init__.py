"""tuner: fine-tunes text-to-image and video diffusion models with Lightning, Hydra, diffusers and peft.

The layout says what each part is:

- ``tuner.run``: the training run, ``python train.py`` (what ``train()`` assembles from the config);
- ``tuner.config``: the typed config (its schemas, the family table, the checks before anything loads);
- ``tuner.runtime``: what a run is made of beyond the model and data (checkpoints' lifecycle, the output lock,
  scaling and clusters, start-up, the console, sweeps);
- ``tuner.interop``: other tools' formats (SimpleTuner configs, single-file checkpoints in and out);
- the commands, each ``python -m tuner.<name>``: ``tiny``, ``inspect``, ``export``, ``import``, ``sample``,
  ``caption``.

The lower floors (``models``, ``datamodules``, ``callbacks``) never import ``tuner``.
"""
