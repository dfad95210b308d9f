"""Motion space: the per-frame facial motion vector (spec.py), and the audio -> motion diffusion backbone."""
