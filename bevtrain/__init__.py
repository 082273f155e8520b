"""bevtrain: multi-camera bird's-eye-view segmentation on nuScenes (Simple-BEV family)."""

__version__ = "0.1.0"
