"""asmb-kd: multi-teacher knowledge distillation in a functional torch.func style."""

__version__ = "0.1.0"
