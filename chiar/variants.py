"""The named model variants: the one registry that the benchmarks, the quality runs and the test
harness build their models from.

A variant is a set of config overrides on a shape. Shapes are the configs shipped in configs/ (the
benchmarks use the paper's v1 shape, `chiar-v1-2op`); the test harness applies the same overrides
on its tiny shape. A layer schedule given as one operator name means that operator in every layer,
so "baseline" is full attention of the same depth as whatever shape it is put on.
"""

import json
from pathlib import Path

import torch

from chiar.data import ArgumentError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# The property tests' shape (and the device check's): small enough for hundreds of models a minute.
TEST_SHAPE = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    rbf_num_features=16,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    max_position_embeddings=512,
    pad_token_id=0,
    router_block_size=8,  # small blocks, so the budget binds on the tests' short sequences
)
TWO_OPS = ["dct", "attention"]
THREE_OPS = ["dct", "rbf", "attention"]

VARIANTS = {
    # What the benchmarks compare (the v1 schedule: dct, routed, routed, attention; 25% attention budget).
    "baseline": dict(layer_schedule="attention"),
    "chiar-threshold": dict(router_type="threshold", routed_operators=TWO_OPS),  # the paper's router
    "chiar-learned": dict(router_type="learned", routed_operators=TWO_OPS),
    "chiar-learned-explore": dict(router_type="learned", router_explore=True),
    # Share control without the auxiliary loss: a bias on the gate's choice, moved by the sign of the share error.
    "chiar-learned-bias": dict(router_type="learned", router_share_control="bias"),
    "chiar-learned-explore-bias": dict(router_type="learned", router_explore=True, router_share_control="bias"),
    "chiar-random": dict(router_type="random", routed_operators=TWO_OPS),  # the control: same share, no signal
    "chiar-3op": dict(router_type="threshold", routed_operators=THREE_OPS),
}
# Every other router x operator combination, and the schedules the spec names: what the property tests cover.
_MATRIX = [dict(router_type=router, routed_operators=ops) for router in ("threshold", "learned", "soft", "random")
           for ops in (TWO_OPS, THREE_OPS, ["rbf", "attention"], ["dct", "rbf"])]
VARIANTS.update({f"{v['router_type']}-{'+'.join(v['routed_operators'])}": v for v in _MATRIX if v not in VARIANTS.values()})
VARIANTS.update(
    {
        "all-routed-3op": dict(layer_schedule="routed", routed_operators=THREE_OPS),
        "all-rbf": dict(layer_schedule="rbf"),
        "all-dct": dict(layer_schedule="dct"),
        "meta-router": dict(use_meta_router=True, routed_operators=THREE_OPS),
        "meta-router-learned": dict(use_meta_router=True, router_type="learned"),
        "post-norm": dict(norm_position="post", routed_operators=THREE_OPS),
        "fixed-thresholds": dict(routed_operators=THREE_OPS, router_thresholds=[0.80, 0.84]),
        "learned-bias-dct+rbf+attention": dict(router_type="learned", routed_operators=THREE_OPS, router_share_control="bias"),
    }
)


def overrides(name, num_layers):
    """The config entries of variant `name` on a shape of `num_layers` layers."""
    if name not in VARIANTS:
        raise ArgumentError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}.")
    entries = dict(VARIANTS[name])
    if isinstance(entries.get("layer_schedule"), str):
        entries["layer_schedule"] = [entries["layer_schedule"]] * num_layers
    return entries


def resolve_config(name):
    """A config path, or the name of a config shipped in configs/ (e.g. `chiar-tiny`)."""
    path = Path(name)
    if path.is_file():
        return str(path)
    shipped = CONFIG_DIR / f"{name.removesuffix('.json')}.json"
    if shipped.is_file():
        return str(shipped)
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
    raise ArgumentError(f"--config_name {name!r} is neither a file nor a shipped config ({available}).")


def shape(name):
    """The entries of a shipped config (or config file), without the ones transformers adds."""
    entries = json.loads(Path(resolve_config(name)).read_text())
    return {key: value for key, value in entries.items() if key not in ("model_type", "architectures", "transformers_version")}


def variant_config(name, base="chiar-v1-2op", **settings):
    """ChiarConfig of variant `name` on shape `base` (a shipped config's name or a dict of entries),
    with `settings` (vocabulary, lengths, dropout...) applied before the variant's overrides."""
    from modeling_chiar import ChiarConfig

    entries = {**(shape(base) if isinstance(base, str) else base), **settings}
    return ChiarConfig(**{**entries, **overrides(name, entries.get("num_hidden_layers", 4))})


def build(model_class, variant, attn_implementation="eager", seed=0, **settings):
    """`model_class` of variant `variant` on the test shape, `settings` applied after the variant's
    overrides, initialised from `seed`."""
    from modeling_chiar import ChiarConfig

    torch.manual_seed(seed)
    config = ChiarConfig(**{**TEST_SHAPE, **overrides(variant, TEST_SHAPE["num_hidden_layers"]), **settings})
    return model_class._from_config(config, attn_implementation=attn_implementation)


def random_ids(batch, length, seed=0, vocab=TEST_SHAPE["vocab_size"]):
    """Token ids 1..vocab-1 (0 is the test shape's padding), the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator)


def config_overrides_argument(name, num_layers=4):
    """Variant `name` as the scripts' --config_overrides value (JSON values, comma-separated)."""
    return ",".join(f"{key}={json.dumps(value, separators=(',', ':'))}" for key, value in overrides(name, num_layers).items())
