"""kd-pipeline: offline knowledge distillation for NLP (library part; recipes live in `stages/`)."""

__version__ = "0.1.0"
