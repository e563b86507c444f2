"""Tooling around the CHIAR model (`modeling_chiar`): evaluation of routing, Hub export.

Nothing here is needed to load a checkpoint; it stays out of the flat module set that Hub
remote code copies next to the weights.
"""
