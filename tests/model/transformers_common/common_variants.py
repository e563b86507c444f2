"""The CHIAR variants transformers' common tests run over (read by the runner and by the tester):
variants of the registry (chiar/variants.py) on the tester's two-layer ["routed", "attention"] model,
two with one more setting."""

from chiar.variants import VARIANTS as REGISTRY

VARIANTS = {
    "threshold-2op": REGISTRY["chiar-threshold"],
    "threshold-3op": REGISTRY["chiar-3op"],
    "learned-3op": REGISTRY["learned-dct+rbf+attention"],
    "soft-meta-3op": {**REGISTRY["soft-dct+rbf+attention"], "use_meta_router": True},
    "bidirectional-3op": {**REGISTRY["chiar-3op"], "is_causal": False},
}
