"""GPU truth: the plain types and the NVML interface (interface.py), the real adapter (nvml.py)
and the fake (fake.py), the health policy, the sampler, the self-test, and the boot's wiring
(guard.py).

selftest_script.py runs as a script, with this directory first on sys.path: no module here may
be named like a standard-library module (a ``types.py`` here breaks its ``import argparse``)."""
