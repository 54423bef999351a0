"""Weight quantization algorithms shared by the quantization and compression passes."""
from .gptq import GPTQResult, Grid, Hessian, UniformGrid, gptq, rtn

__all__ = ["GPTQResult", "Grid", "Hessian", "UniformGrid", "gptq", "rtn"]
