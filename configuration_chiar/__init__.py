"""`from configuration_chiar import ChiarConfig`: the config lives with the model code in
`modeling_chiar/` because Hub remote code copies a checkpoint's modules into one flat folder."""

from modeling_chiar.configuration_chiar import ChiarConfig

__all__ = ["ChiarConfig"]
