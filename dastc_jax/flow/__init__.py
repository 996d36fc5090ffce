"""Optical flow: RAFT in Flax NNX, its weights, and flows for the datasets."""
