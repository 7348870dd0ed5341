"""MixQuant: mixed-precision quantization of text-to-image diffusion models.

This folder is at once the importable package ``mixquant`` and a ComfyUI node pack. ComfyUI imports it under
whatever name the folder has, so everything inside uses relative imports only. Importing it never requires
ComfyUI: the node classes only touch ``comfy`` inside their functions.
"""
__version__ = "0.1.0"

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:  # loaded as a bare file, not as a package (pytest collecting a checkout folder whose name is no identifier)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
