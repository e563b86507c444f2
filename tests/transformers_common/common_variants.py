"""The CHIAR variants transformers' common tests run over (read by the runner and by the tester)."""

THREE_OPS = ["dct", "rbf", "attention"]

# Config overrides on the tester's two-layer ["routed", "attention"] model.
VARIANTS = {
    "threshold-2op": dict(),
    "threshold-3op": dict(routed_operators=THREE_OPS),
    "learned-3op": dict(router_type="learned", routed_operators=THREE_OPS),
    "soft-meta-3op": dict(router_type="soft", use_meta_router=True, routed_operators=THREE_OPS),
    "bidirectional-3op": dict(is_causal=False, routed_operators=THREE_OPS),
}
