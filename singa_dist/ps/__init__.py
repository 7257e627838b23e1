"""SINGA's parameter server: slicing, the server processes and the workers' side of the update protocol.

`python -m singa_dist.ps` runs one server process (singa-launch starts them); see docs/parameter_server.md.
"""
from .slicing import Slice, server_loads, slice_params

__all__ = ["Slice", "server_loads", "slice_params"]
