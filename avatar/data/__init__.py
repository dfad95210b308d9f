"""Synthetic talking-face corpus: procedural faces, espeak-ng speech and singing, oracle ground truth."""
