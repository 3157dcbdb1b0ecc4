"""Training: optimizer and schedule, the jit train step, checkpoints, the loop.

Uses core/, models/, data/ (for the input pipeline) and evaluation/ (periodic
evaluation); never deploy/ or interop/ except to load a pretrained backbone.
"""
