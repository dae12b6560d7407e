"""blip_app: talk with images through BLIP-2 and InstructBLIP."""

__version__ = "0.1.0"
