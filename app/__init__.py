"""Adapters and front ends: the CLI, diffusers loading, the Gradio demo."""
