"""Compute for the quantized layers, kept apart from the method (quant/) that calls it.

- packing.py, reference.py: the stored layouts and the plain-torch reference of every op (the contract);
- dispatch.py: picks an implementation per call (Triton on CUDA, the measured CPU route on CPU, else the
  reference), can be forced (MIXQUANT_KERNELS) and explains itself (`describe()`);
- registry.py: the backend registry dispatch.py fills: priority list, availability probed once, and per op the
  constraints each backend accepts, as data;
- cache.py: the per-layer kernel caches every backend keeps (keys on pointer, version and the layer's epoch);
- triton_gemm.py, triton_conv.py: int8 tensor-core GEMM / implicit-GEMM conv on packed 8/4/2-bit weights;
- cpu_ops.py: the CPU routes (oneDNN int8, torch._int_mm, dequantize-then-matmul);
- cpu_routes.py: which CPU route a call takes, chosen per machine and per shape by measurement (and remembered);
- synthetic.py: random calls in the stored layout, for tests and benchmarks.
"""
