"""GPU truth: the NVML interface (real and fake), the health policy, the sampler, the self-test."""
