"""Mamba selective state-space layers: selective scan and causal convolution kernels."""
