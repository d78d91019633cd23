"""Serving: an HTTP service running the apprentice tuning-free beside per-subject DreamBooth.
(Not built yet: issue 7.)"""
