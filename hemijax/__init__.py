"""hemijax: segmentation of multi-modal 3D medical images with any subset of modalities missing."""
__version__ = "0.1.0"
