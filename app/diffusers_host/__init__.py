"""The diffusers host: everything that knows diffusers pipelines (loading, the pipeline runner for quant/, the
quantized file of a pipeline's denoiser, the one-call API, the quality harness, image helpers). Imports quant/ and
the digits model; never the CLI or the Gradio app.

    from mixquant.app.diffusers_host.api import quantize_pipeline
    from mixquant.app.diffusers_host.models import load_pipeline
"""
