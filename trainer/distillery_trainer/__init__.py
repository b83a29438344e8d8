"""The Distillery trainer: teacher -> student knowledge distillation of a DistillationJob, on transformers'
Trainer (DDP under torchrun, mixed precision, checkpoints), writing a servable artifact with its lineage.

`distillery-train -f job.yaml` (cli.py) is what the Kubeflow TrainJob's pods run and what a user runs locally.
"""

__version__ = "0.1.0"
