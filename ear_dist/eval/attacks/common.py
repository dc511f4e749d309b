"""What the white-box attacks share: the teacher-forced loss of target images under a prompt,
new words fed by learned vectors, and a model left exactly as it was found.

The attacks never change the model's weights: the parameters are frozen for the attack's
duration (their ``requires_grad`` flags restored after), gradients are taken with
``torch.autograd.grad`` toward the attack's own tensors only, and new words live in a copy
of the tokenizer while forward hooks on the input-embedding module feed their vectors.
Only the Janus family (a decoder whose prompt tokens go through ``get_input_embeddings``)
is supported; the VAR family encodes prompts with a T5 under ``no_grad`` and is refused.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Sequence

import torch

from ear_dist.errors import InputError
from ear_dist.models.interface import ImageModel


class AttackError(InputError, ValueError):
    """An attack that cannot run on the model or settings given; the message says which and why."""


def check_family(model: ImageModel, attack: str) -> None:
    if getattr(model, "family", "") != "janus":
        raise AttackError(f"{attack}: white-box attacks support the janus family only, not {model.family!r} "
                          "(a var model encodes prompts with a T5 under no_grad)")
    if getattr(model, "tokenizer", None) is None:
        raise AttackError(f"{attack}: model {model.name!r} has no tokenizer; the attacks work on prompts")


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Every parameter with ``requires_grad`` off for the block (so no ``.grad`` lands on the model), then the
    flags and the train/eval mode restored; gradients enabled inside (for the attack's own tensors) even when the
    caller samples under ``torch.no_grad``."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    training = module.training
    module.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        module.train(training)


LOGITS_BYTES_PER_PASS = 1 << 30  # float32 head logits one teacher-forced pass may hold (~28 rows at the 7B shape)


def rows_per_pass(model: ImageModel) -> int:
    """Sequences one teacher-forced pass takes, so its logits stay under ``LOGITS_BYTES_PER_PASS``."""
    return max(1, LOGITS_BYTES_PER_PASS // (4 * model.num_image_tokens * model.head_width))


def image_loss(model: ImageModel, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy of ``tokens`` [B, T] under the encoded prompts, one value per row [B]."""
    _, logits = model.teacher_forced(model.model, ids, mask, tokens)
    per_token = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
    return per_token.reshape(tokens.shape).mean(dim=1)


def sample_targets(model: ImageModel, prompts: Sequence[str], seed: int, guidance_weight: float,
                   temperature: float = 1.0, top_k: int = 0, batch_size: int = 64) -> torch.Tensor:
    """The model's own CFG images [N, T] of ``prompts`` (seeds ``seed + i``): what an attack tries to bring back."""
    with torch.no_grad():
        return model.sample(list(prompts), guidance_weight=guidance_weight, temperature=temperature, top_k=top_k,
                            seeds=[seed + i for i in range(len(prompts))], batch_size=batch_size)


@contextlib.contextmanager
def new_words(model: ImageModel, words: Sequence[str], vectors: Callable[[], torch.Tensor]) -> Iterator[list[int]]:
    """Within the block, prompts may hold ``words``: the model's tokenizer is a copy that knows them, and the
    input-embedding module returns ``vectors()[k]`` (shape [K, hidden]) wherever word k stands. Yields their ids.

    The ids the copy gives them are remapped to the pad id before the embedding lookup (they may lie past the
    embedding table), and the unconditional CFG prompt turns them into pad like any other prompt word. The
    tokenizer and the hooks are restored however the block ends.
    """
    tokenizer = copy.deepcopy(model.tokenizer)
    from tokenizers import AddedToken

    clash = [w for w in words if w in tokenizer.get_vocab()]
    if clash:
        raise AttackError(f"new words {clash} are already in the tokenizer's vocabulary")
    tokenizer.add_tokens([AddedToken(w, special=True, normalized=False) for w in words], special_tokens=True)
    ids = [int(tokenizer.convert_tokens_to_ids(w)) for w in words]
    id_tensor = torch.tensor(ids, device=model.device)
    pad = int(model.prompt_format.pad_token_id)
    embedding = model.model.get_input_embeddings()
    where: dict[str, torch.Tensor] = {}

    def before(module, args):
        input_ids = args[0]
        hit = torch.isin(input_ids, id_tensor)
        where["hit"], where["slot"] = hit, (input_ids[..., None] == id_tensor).long().argmax(-1)
        return (torch.where(hit, torch.full_like(input_ids, pad), input_ids), *args[1:])

    def after(module, args, output):
        hit = where.pop("hit")
        if not bool(hit.any()):
            where.pop("slot")
            return output
        table = vectors().to(output.dtype)[where.pop("slot")]
        return torch.where(hit[..., None], table, output)

    original = model.tokenizer
    handles = [embedding.register_forward_pre_hook(before), embedding.register_forward_hook(after)]
    model.tokenizer = tokenizer
    try:
        yield ids
    finally:
        model.tokenizer = original
        for h in handles:
            h.remove()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def pick(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` indices of ``range(n)``, without repetition while k <= n (a seeded permutation, cycled)."""
    order = torch.randperm(n, generator=gen)
    return order.repeat((k + n - 1) // n)[:k]
