"""Fine-tune a BERT-style classifier with SBM attention and the sparsity term (transformers).

The task is generated here: sequences of random tokens of varying length (padded on the right),
labelled 1 when both marker tokens A and B occur somewhere in the sequence. The [CLS] position has
to find both markers, so the classifier needs attention between input-dependent positions.

    pip install -e ".[hf]"
    python examples/hf_finetune.py                      # a tiny BERT built from a config
    python examples/hf_finetune.py --pretrained PATH    # a local BERT-style checkpoint

Runs in well under a minute on a CPU with the tiny model and prints the test accuracy and the
density of the sampled attention graphs per layer. The token ids are synthetic (markers 5 and 6,
[CLS] 2, padding 0) whatever the checkpoint's vocabulary.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
)

from sbm_transformer.integrations.huggingface import sbm_density, sbmify


def make_task(
    size: int, vocab: int, generator: torch.Generator, min_length: int = 8, max_length: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (size, max_length) with [CLS]=2 first, an attention mask (1 = token) and labels.

    Markers are tokens 5 and 6, other tokens are drawn from 10..vocab-1, padding is 0. Half of the
    sequences hold both markers (label 1); the rest hold only A, only B or neither, a third each.
    """
    lengths = torch.randint(min_length, max_length + 1, (size,), generator=generator)
    ids = torch.randint(10, vocab, (size, max_length), generator=generator)
    mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    labels = (torch.rand(size, generator=generator) < 0.5).long()
    other = torch.randint(0, 3, (size,), generator=generator)  # 0: only A, 1: only B, 2: neither
    has = {5: (labels == 1) | (other == 0), 6: (labels == 1) | (other == 1)}
    # Both markers of a sequence at distinct real positions after [CLS].
    first = 1 + (torch.rand(size, generator=generator) * (lengths - 1)).long()
    shift = 1 + (torch.rand(size, generator=generator) * (lengths - 2)).long()
    where = {5: first, 6: 1 + (first - 1 + shift) % (lengths - 1)}
    for marker in (5, 6):
        rows = torch.nonzero(has[marker]).squeeze(1)
        ids[rows, where[marker][rows]] = marker
    ids[:, 0] = 2
    return ids * mask, mask, labels


def build_model(pretrained: str | None) -> PreTrainedModel:
    """A tiny randomly initialised BERT classifier, or one from a local checkpoint (BERT,
    RoBERTa, ...: any encoder whose attention uses transformers' attention interface)."""
    if pretrained is not None:
        return AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=2)
    config = BertConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    config.num_labels = 2
    return BertForSequenceClassification(config)


@torch.no_grad()
def accuracy(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(ids), 256):
        part = slice(start, start + 256)
        logits = model(input_ids=ids[part], attention_mask=mask[part]).logits
        correct += int((logits.argmax(-1) == labels[part]).sum())
    model.train()
    return correct / len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", help="path of a local BERT-style checkpoint")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sparsity-weight", type=float, default=1e-2)
    parser.add_argument("--num-clusters", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = build_model(args.pretrained)
    vocab = min(model.config.vocab_size, 1000)
    generator = torch.Generator().manual_seed(args.seed)
    train = make_task(4000, vocab, generator)
    test = make_task(1000, vocab, generator)

    sbmify(model, num_clusters=args.num_clusters)
    sbm = [p for n, p in model.named_parameters() if ".sbm." in n]
    rest = [p for n, p in model.named_parameters() if ".sbm." not in n]
    # No weight decay on the SBM parameters: it would pull every rate scale towards 1 and the
    # clusters towards a uniform block matrix, whatever the task wants.
    optimizer = torch.optim.AdamW(
        [{"params": rest, "weight_decay": 0.01}, {"params": sbm, "weight_decay": 0.0}], lr=1e-3
    )

    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(train[0]), (args.batch_size,), generator=generator)
        out = model(input_ids=train[0][rows], attention_mask=train[1][rows], labels=train[2][rows])
        density = torch.cat(sbm_density(model)).mean()
        loss = out.loss + args.sparsity_weight * density  # the paper's sparsity term
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: loss {out.loss.item():.3f}, density {density.item():.3f}")
    elapsed = time.perf_counter() - start

    acc = accuracy(model, *test)
    model.eval()
    with torch.no_grad():
        model(input_ids=test[0][:256], attention_mask=test[1][:256])
        per_layer = [round(d.mean().item(), 3) for d in sbm_density(model)]
    print(f"trained {args.steps} steps in {elapsed:.1f} s")
    print(f"test accuracy {acc:.3f} (chance 0.5)")
    # Densities count edges among all (query, key) pairs of the padded batch; full attention
    # would reach every real key from every query: this fraction.
    full = test[1][:256].float().mean().item()
    print(f"attention density per layer {per_layer}; full attention: {full:.3f}")


if __name__ == "__main__":
    main()
