"""The hosts and front ends of MixQuant, in four parts:

- ``diffusers_host/``: everything that knows diffusers pipelines: loading models (``models``), the DenoiserRunner that
  drives a pipeline (``runner``), the diffusers side of the quantized file and the quantize outputs (``files``), the
  one-call API (``api``), the FP-vs-quantized quality harness (``harness``) and the image helpers (``images``).
- ``digits/``: the embedded `digits` model: its prompt vocabulary and parser, the digit classifier that judges it,
  ``DIGITS_DIR``; ``digits.train`` trains it (``python -m mixquant.app.digits.train``).
- ``gradio_app``: the Gradio app (``mixquant demo``).
- ``cli/``: the ``mixquant`` command and its subcommands (quantize, generate, inspect, export, demo).

Import rule (tests/test_layering.py): cli -> {diffusers_host, digits, gradio_app} -> quant/, kernels/;
gradio_app -> {diffusers_host, digits}; diffusers_host -> digits (the digits model is a diffusers model). Nothing
imports ``cli`` except the ``mixquant`` entry point.
"""
