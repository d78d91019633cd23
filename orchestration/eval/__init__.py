"""Evaluation: the DreamBench protocol (DINO, CLIP-I, CLIP-T, PRES, DIV) for every suti method,
on DreamBench-layout folders and on the synthetic world (plus its exact probe accuracies)."""
