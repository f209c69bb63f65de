"""Distributed plumbing: process group set-up, the engine over the SGD suffix, delta sync."""
