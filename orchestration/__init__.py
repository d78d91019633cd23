"""The top layer: what runs the stages together.

* :mod:`orchestration.cli`: the ``suti`` console script (one subcommand group per capability);
* :mod:`orchestration.demo`: ``suti demo``, the main job on the synthetic world;
* :mod:`orchestration.eval`: ``suti eval``, the DreamBench protocol;
* :mod:`orchestration.compare`: apprentice vs expert vs base on the world's held-out subjects;
* :mod:`orchestration.fixed_eval`: the fixed evaluation of the in-context comparisons.

Nothing below imports it (``tests/test_layers.py`` keeps the layers).
"""
