"""MixQuant as a Stable Diffusion WebUI (Forge, A1111) extension: host logic (host.py) behind the thin WebUI glue in
scripts/mixquant_webui.py, which WebUI loads from this folder."""
