"""Weight quantization algorithms shared by the quantization and compression passes."""
from .calibrate import Quantized, calibrate
from .checkpoint import load, save
from .gptq import GPTQResult, Grid, Hessian, UniformGrid, gptq, rtn
from .schemes import SCHEMES, Scheme, get_scheme

__all__ = ["SCHEMES", "GPTQResult", "Grid", "Hessian", "Quantized", "Scheme", "UniformGrid", "calibrate", "get_scheme",
           "gptq", "load", "rtn", "save"]
