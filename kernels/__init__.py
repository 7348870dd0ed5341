"""Compute for the quantized layers, kept apart from the method (quant/) that calls it.

- packing.py, reference.py: the stored layouts and the plain-torch reference of every op (the contract);
- dispatch.py: picks an implementation per call (Triton on CUDA, the measured CPU route on CPU, else the
  reference), can be forced (MIXQUANT_KERNELS) and explains itself (`describe()`);
- triton_gemm.py, triton_conv.py: int8 tensor-core GEMM / implicit-GEMM conv on packed 8/4/2-bit weights;
- cpu.py: oneDNN int8 and dequantize-then-matmul routes, chosen per machine and per shape by measurement;
- synthetic.py: random calls in the stored layout, for tests and benchmarks.
"""
