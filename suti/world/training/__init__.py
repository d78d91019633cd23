"""Training of the synthetic world's models, kept apart from the models themselves (as
diffusers keeps its training scripts in ``examples/``).

* :mod:`suti.world.training.t2i` - the toy text-to-image model (:mod:`suti.world.toy_t2i`):
  ``pretrain_t2i``, ``continue_t2i`` (``suti world pretrain --what t2i``); its autoencoder
  stages in :mod:`suti.world.training.t2i_vae`;
* :mod:`suti.world.training.clip` - the toy CLIP (:mod:`suti.world.toy_clip`): ``pretrain_clip``
  (``python -m suti.world.training.clip``, ``suti world pretrain --what clip``);
* :mod:`suti.world.training.probe` - the attribute probe (:mod:`suti.world.probe`):
  ``pretrain_probe`` (``python -m suti.world.training.probe``);
* :mod:`suti.world.training.scenes` - the scene sources they train on;
  :mod:`suti.world.training.schedule` - progress and learning-rate schedules.

The model modules import nothing from here: when shipped weights are missing they name their
training run as a ``"module:function"`` string, resolved only then.
"""
