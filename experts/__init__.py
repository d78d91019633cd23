"""Per-subject DreamBooth experts: training, loading and sampling.

>>> from experts import load_pipeline, train_expert, resolve_config, load_expert
"""

from experts.expert import ExpertInfo, load_expert
from experts.recipe import ExpertConfig, list_recipes, load_recipe, resolve_config
from suti.models import load_pipeline


def train_expert(*args, **kwargs):
    """See :func:`experts.train.train_expert` (imported lazily: it pulls in diffusers)."""
    from experts.train import train_expert as _train

    return _train(*args, **kwargs)


__all__ = ["ExpertConfig", "ExpertInfo", "list_recipes", "load_expert", "load_pipeline", "load_recipe", "resolve_config", "train_expert"]
