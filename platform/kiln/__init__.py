"""kiln: train models at scale on Ray + DeepSpeed, register them, serve and score them."""

__version__ = "0.1.0"
