"""cl-proxyfda: continual fine-tuning of CLIP-like models without forgetting."""
__version__ = "0.1.0"
