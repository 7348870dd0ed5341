"""ComfyUI nodes: thin adapters over mixquant.quant. Filled in by the ComfyUI issue."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
