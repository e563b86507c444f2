"""Token batches for the tooling (routing statistics, the audit): documents encoded and cut to the
model's length, right-padded with a mask (the model excludes padding), and classification examples
with their label ids. The training scripts batch with the Trainer's collators instead."""

import torch


def default_length(config, max_length=None):
    """Tokens per sequence: `max_length` if given, else min(512, max_position_embeddings)."""
    limit = config.max_position_embeddings
    if max_length is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings={limit}.")
    return max_length or min(512, limit)


def encode_documents(tokenizer, documents, max_length):
    """Token ids per sequence: each document on its own, split into chunks of at most `max_length`
    tokens (nothing dropped; a chunk starts a fresh context, as a new document would)."""
    for text in documents:
        ids = tokenizer(text)["input_ids"]
        for start in range(0, len(ids), max_length):
            yield ids[start : start + max_length]


def make_batches(sequences, batch_size, pad_id=0):
    """(input_ids, attention_mask) tensors of up to `batch_size` sequences, right-padded."""
    batch = []
    for ids in sequences:
        batch.append(list(ids))
        if len(batch) == batch_size:
            yield _pad(batch, pad_id)
            batch = []
    if batch:
        yield _pad(batch, pad_id)


def _pad(batch, pad_id):
    length = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def pad_id_for(model, tokenizer):
    for candidate in (getattr(tokenizer, "pad_token_id", None), model.config.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None and 0 <= candidate < model.config.vocab_size:
            return candidate
    return 0  # any id works: padding is masked out everywhere


def lm_blocks(tokenizer, documents, block_size):
    """Documents concatenated and cut into blocks of `block_size` tokens (as run_clm.py evaluates);
    the last, shorter block is kept so no token is left out."""
    ids = []
    for text in documents:
        ids.extend(tokenizer(text)["input_ids"])
    return [ids[i : i + block_size] for i in range(0, len(ids), block_size) if len(ids[i : i + block_size]) > 1]


def classification_examples(tokenizer, records, config, max_length):
    """(ids, label id) per record; labels are names in config.label2id or integer ids."""
    label2id = {str(k): v for k, v in (config.label2id or {}).items()}
    examples = []
    for record in records:
        label = record["label"]
        if str(label) in label2id:
            label_id = label2id[str(label)]
        elif isinstance(label, int) or str(label).lstrip("-").isdigit():
            label_id = int(label)
        else:
            raise ValueError(f"Label {label!r} is not one of the model's labels {sorted(label2id)}.")
        if not 0 <= label_id < config.num_labels:
            raise ValueError(f"Label {label!r} is outside the model's {config.num_labels} classes.")
        ids = tokenizer(record["text"])["input_ids"][:max_length]
        if ids:
            examples.append((ids, label_id))
    return examples
