"""Training: the EMO stages (`stages.py`), the accelerate loop (`loop.py`), LCM distillation (`distill.py`)."""
