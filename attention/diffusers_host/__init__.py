"""The diffusers host: the engine as an attn1 processor of a diffusers UNet (``processor.py``).

A host beside the engine, as ``nodes/host/`` is ComfyUI's: it imports the engine, the engine never
imports it, and it never imports diffusers itself. Kept empty: import ``processor``.
"""
