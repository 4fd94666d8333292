"""piva: text-driven editing of NeRFs and images by score distillation (PiVa, DDS, SDS)."""

__version__ = "0.1.0"
