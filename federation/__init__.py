"""What travels between sites and how it is combined.

payload.py   safetensors bytes + JSON metadata: the only wire format (never pickle)
aggregate.py weighted federated averaging and the checks every received update passes
site.py      one site's model, data and metrics across the run (plain PyTorch)
engine.py    the thin wrapper over FeatureCloud's engine (the only module here that imports it)
"""
