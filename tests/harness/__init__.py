"""Shared test machinery: the real ComfyUI host, random-weight checkpoints, graph runners."""
