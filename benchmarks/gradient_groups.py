"""Where a trained model's gradient is: the norm of one training-mode batch's gradient per parameter
group (embeddings, each layer, each routed layer's router), and each gate's share biases.

    python benchmarks/gradient_groups.py benchmarks/results/runs-wikitext-epoch-chiar-learned-bias-seed1
    python benchmarks/gradient_groups.py RUN_DIR --text_file ../shared/data/wikitext-2/wiki.valid.tokens --rows 8

RUN_DIR is a folder a `run_clm.py` run left (model and tokenizer). The batch is the first rows x 256
tokens of the text file; dropout is on (training mode), the seed fixed. Prints, and writes nothing.
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from modeling_chiar import ChiarForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def group_of(name):
    """'embed_tokens', 'layer 2', 'layer 1 router', 'norm', ... for a parameter name."""
    parts = name.split(".")
    if parts[1] == "layers":
        return f"layer {parts[2]}" + (" router" if ".router." in name else "")
    return parts[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--text_file", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    model = ChiarForCausalLM.from_pretrained(args.run_dir).train()
    tokenizer = AutoTokenizer.from_pretrained(args.run_dir)
    ids = tokenizer(args.text_file.read_text()[: 400 * args.rows * args.length])["input_ids"]
    ids = torch.tensor(ids[: args.rows * args.length]).view(args.rows, args.length)
    torch.manual_seed(0)
    out = model(ids, labels=ids)
    out.loss.backward()
    squares = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            squares[group_of(name)] = squares.get(group_of(name), 0.0) + parameter.grad.float().square().sum().item()
    print(f"{args.run_dir}: loss {out.loss.item():.3f}, gradient norm {sum(squares.values()) ** 0.5:.3f}")
    for group, square in sorted(squares.items(), key=lambda item: -item[1]):
        print(f"  {group:<16} {square ** 0.5:.3f}")
    for i, layer in enumerate(model.model.layers):
        router = getattr(getattr(layer, "mixer", None), "router", None)
        for name in ("train_share_bias", "share_bias"):
            if hasattr(router, name):
                print(f"  layer {i} {name}: {[round(v, 2) for v in getattr(router, name).tolist()]}")


if __name__ == "__main__":
    main()
