"""The photo renderer: a portrait's own pixels animated by a motion vector (avatar/motion/spec.py).

`analyse_portrait` finds and measures the face once per avatar (`PhotoAnalysis`, cached on disk);
`PhotoRenderer` turns the analysis plus one motion frame into a frame made of the photo's pixels.
"""
from avatar.photo.analysis import PhotoAnalysis, analyse_portrait, reference_embedding
from avatar.photo.renderer import PhotoRenderer

__all__ = ["PhotoAnalysis", "PhotoRenderer", "analyse_portrait", "reference_embedding"]
