"""nn.Module layers built on the ops."""
from spectral_kernels.nn.speclora import SpecLoRALinear
from spectral_kernels.nn.spectral_linear import SpectralLinear

__all__ = ["SpecLoRALinear", "SpectralLinear"]
