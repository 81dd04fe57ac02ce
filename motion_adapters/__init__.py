"""motion_adapters: learn a motion from one video into a video model's temporal attention (VMC)."""

__version__ = "0.1.0"
