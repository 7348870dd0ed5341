"""ComfyUI nodes: thin adapters over mixquant.quant (nodes.py: the node classes; runner.py: sampling through
ComfyUI; patching.py: quantized layers into a MODEL; planning.py: plan from a calibration). Importing this package
never imports ComfyUI; when ComfyUI is there, models/mixquant is registered as a model folder."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_folder

register_folder()  # a no-op outside ComfyUI

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
