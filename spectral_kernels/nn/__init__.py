"""nn.Module layers built on the ops."""
from spectral_kernels.nn.spectral_linear import SpectralLinear

__all__ = ["SpectralLinear"]
