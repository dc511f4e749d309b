"""The lean decode path of CFG rollouts: one static-cache token step on fixed buffers, replayed.

The eager loop (``rollout.py``) runs every image token as Python: a dozen small ops
around one decoder forward, each a kernel launch. At the 7B shape on a GPU a batch of
rollouts is then bound by launches and host work, not by the math. Here one token's
whole step (image-token embedding, decoder forward over the static KV cache, generation
head, CFG combination of the cond and uncond rows, sampling, writing the token) reads
and writes fixed buffers, so it can be

- ``cuda_graph``: captured once as a CUDA graph and replayed per token: one replay call
  per token on the host, and no host sync until the caller reads the tokens;
- ``compiled``: ``torch.compile`` of the step, ``mode="reduce-overhead"`` on CUDA (CUDA
  graphs under inductor); elsewhere a compiled CPU kernel, which is how CI tests it.

Greedy decoding gives the eager loop's tokens (tests). Sampling cannot use
``torch.multinomial`` with one generator per row inside a graph, so it draws
Gumbel-max noise from a counter-based hash of (seed, image-token index, code) on the
device: the same distribution as the eager loop, other draws; a seed still gives the
same image whatever batch it is sampled in.

A decoder holds a static cache for its batch and prompt length; one decoder per model
is kept, so a run that samples same-shaped batches captures (or compiles) once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers import StaticCache

from ear_dist.config import ConfigError
from ear_dist.models.janus.bundle import JanusBundle, position_ids_from_mask, unconditional_ids

DECODE_MODES = ("eager", "compiled", "cuda_graph", "auto")
_MASK32 = 0xFFFFFFFF


def resolve_decode(decode: str, device: torch.device) -> str:
    """``auto`` -> ``cuda_graph`` on CUDA, ``eager`` elsewhere; ``cuda_graph`` needs a CUDA device."""
    if decode not in DECODE_MODES:
        raise ValueError(f"rollout.decode: {decode!r} is not one of {', '.join(DECODE_MODES)}")
    on_cuda = torch.device(device).type == "cuda"
    if decode == "auto":
        return "cuda_graph" if on_cuda else "eager"
    if decode == "cuda_graph" and not on_cuda:
        raise ConfigError(f"rollout.decode=cuda_graph: the model is on {device}; CUDA graphs need a CUDA device "
                         "(use compiled, eager or auto)")
    return decode


# --------------------------------------------------------------------------- sampling on the device


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """``x * m mod 2**32`` for x in [0, 2**32) without overflowing int64 (split x into 16-bit halves)."""
    hi, lo = x >> 16, x & 0xFFFF
    return ((((hi * m) & 0xFFFF) << 16) + lo * m) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (the 'lowbias32' constants), on int64 tensors."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, index: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), [rows, V]: a pure function of (seed, image-token index, code), no generator state."""
    key = mix32(seeds + _mul32(index.expand_as(seeds) + 1, 0x9E3779B1))  # [rows]
    bits = mix32(key[:, None] ^ codes[None, :])
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def tempered_logits(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """[rows, V] logits in float32 divided by the temperature, all but the ``top_k`` largest at -inf (0 = all)."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def gumbel_sample(logits: torch.Tensor, seeds: torch.Tensor, index: torch.Tensor, codes: torch.Tensor,
                  temperature: float, top_k: int, greedy: bool) -> torch.Tensor:
    """One token per row of [rows, V] logits: argmax, or Gumbel-max over temperature / top-k logits."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    gumbel = -torch.log(-torch.log(counter_uniform(seeds, index, codes)))
    return (tempered_logits(logits, temperature, top_k) + gumbel).argmax(-1)


# --------------------------------------------------------------------------- the decoder


@dataclass(frozen=True)
class DecoderKey:
    """What a decoder's buffers and captured step depend on."""

    mode: str
    batch: int
    prompt_len: int
    num_tokens: int
    guidance_weight: float
    temperature: float
    top_k: int
    greedy: bool


class LeanDecoder:
    """Static buffers, a static KV cache, and the token step on them (captured, compiled, or run as is).

    ``mode``: ``cuda_graph``, ``compiled``, or ``uncaptured`` (the same buffers and step,
    run eagerly: what the graph replays, checkable on a CPU).
    """

    def __init__(self, bundle: JanusBundle, key: DecoderKey):
        self.bundle, self.key = bundle, key
        model = bundle.model
        device = bundle.device
        self.guided = key.guidance_weight != 1.0
        self.rows = key.batch * (2 if self.guided else 1)
        max_len = key.prompt_len + key.num_tokens
        self.cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_len)
        long = dict(dtype=torch.long, device=device)
        self.mask = torch.ones(self.rows, max_len, **long)
        self.ids = torch.zeros(self.rows, **long)  # the token fed next, on every row
        self.position = torch.zeros(self.rows, 1, **long)
        self.index = torch.zeros(1, **long)  # the image token the step writes
        self.seeds = torch.zeros(key.batch, **long)
        self.tokens = torch.zeros(key.batch, key.num_tokens, **long)
        self.codes = torch.arange(bundle.codebook_size, **long)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._step = self._forward_step
        if key.mode == "compiled":
            on_cuda = device.type == "cuda"
            self._step = torch.compile(self._forward_step, mode="reduce-overhead" if on_cuda else None,
                                       fullgraph=True)
        elif key.mode == "cuda_graph":
            self._capture()

    # ----------------------------------------------------------------- one token
    def _next_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """Head, CFG combination and sampling: [rows, H] last hidden states -> [batch] tokens."""
        k = self.key
        logits = self.bundle.model.model.generation_head(hidden).float()
        if self.guided:
            cond, uncond = logits.split(k.batch)
            logits = uncond + k.guidance_weight * (cond - uncond)
        return gumbel_sample(logits, self.seeds, self.index, self.codes, k.temperature, k.top_k, k.greedy)

    def _forward_step(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Feed one token per row through the cached decoder; return the next token per prompt."""
        model = self.bundle.model
        embeds = model.prepare_embeddings_for_image_generation(ids[:, None])
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=self.mask, position_ids=position,
                                         past_key_values=self.cache, use_cache=True)
        return self._next_token(out.last_hidden_state[:, -1])

    def _write(self, nxt: torch.Tensor) -> None:
        """Store token ``index`` and make it the next input (in place: the graph's buffers stay put)."""
        self.tokens.index_copy_(1, self.index, nxt[:, None])
        self.ids.copy_(torch.cat([nxt, nxt]) if self.guided else nxt)
        self.position.add_(1)
        self.index.add_(1)

    def _step_in_place(self) -> None:
        self._write(self._step(self.ids, self.position))

    def _capture(self) -> None:
        """Warm up on a side stream (lazy cache allocation, library handles), then capture one step."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step_in_place()
        torch.cuda.current_stream().wait_stream(side)
        self.cache.reset()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._step_in_place()

    # ----------------------------------------------------------------- a batch
    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, seeds: torch.Tensor,
            progress: bool = False, uncond: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Image tokens [B, T] for left-padded prompts ending in begin-of-image (the decoder's shape); ``uncond``:
        the (ids, mask) of the unconditional rows (negative prompts, same shape), else the pad prompt."""
        model, k = self.bundle.model, self.key
        rows, mask = guided_rows(self.bundle, input_ids, attention_mask, self.guided, uncond)
        self.cache.reset()
        positions = position_ids_from_mask(mask)
        out = model.model.language_model(inputs_embeds=model.get_input_embeddings()(rows), attention_mask=mask,
                                         position_ids=positions, past_key_values=self.cache, use_cache=True)
        self.mask[:, : k.prompt_len].copy_(mask)
        self.seeds.copy_(seeds)
        self.index.zero_()
        self.position.copy_(positions[:, -1:])
        self._write(self._next_token(out.last_hidden_state[:, -1]))
        steps = range(1, k.num_tokens)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="image tokens", leave=False, unit="tok")
        for _ in steps:
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step_in_place()
        return self.tokens.clone()


# one decoder per model: its static cache is as large as a rollout batch's KV cache
_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, LeanDecoder]" = weakref.WeakKeyDictionary()


def lean_decoder(bundle: JanusBundle, key: DecoderKey) -> LeanDecoder:
    """The model's decoder for ``key``, reused while calls keep that shape; a new shape replaces it."""
    current = _DECODERS.get(bundle.model)
    if current is None or current.key != key:
        _DECODERS.pop(bundle.model, None)  # free the old cache before allocating the new one
        current = _DECODERS[bundle.model] = LeanDecoder(bundle, key)
    return current


def release_decoders(model: torch.nn.Module) -> bool:
    """Drop the model's decoder and with it its static KV cache (a batch's worth); True if there was one."""
    return _DECODERS.pop(model, None) is not None


def lean_rollout_ids(bundle: JanusBundle, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str,
                     guidance_weight: float, temperature: float, top_k: int, greedy: bool,
                     seeds: Optional[Sequence[int]], num_tokens: int, progress: bool = False,
                     uncond: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``rollout_ids`` through the lean decoder (``mode``: compiled, cuda_graph or uncaptured)."""
    batch, prompt_len = input_ids.shape
    key = DecoderKey(mode, batch, prompt_len, num_tokens, float(guidance_weight), float(temperature), int(top_k),
                     bool(greedy or temperature == 0))
    if seeds is None:  # unseeded sampling still follows torch's global seed
        seed_tensor = torch.randint(0, 2**31 - 1, (batch,), dtype=torch.long)
    else:
        seed_tensor = torch.tensor([int(s) & _MASK32 for s in seeds], dtype=torch.long)
    decoder = lean_decoder(bundle, key)
    return decoder.run(input_ids, attention_mask, seed_tensor.to(bundle.device), progress=progress, uncond=uncond)


def guided_rows(bundle: JanusBundle, input_ids: torch.Tensor, attention_mask: torch.Tensor, guided: bool,
                uncond: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout's prompt rows and mask: the conditional rows, then (under CFG) the unconditional ones, the
    pad prompt as Janus makes it or ``uncond``'s (ids, mask) of negative prompts (padded to the prompts' length)."""
    if not guided:
        return input_ids, attention_mask
    if uncond is None:
        return torch.cat([input_ids, unconditional_ids(input_ids, bundle.prompt_format)]), attention_mask.repeat(2, 1)
    ids, mask = uncond
    if ids.shape != input_ids.shape:
        raise ValueError(f"negative prompts of shape {tuple(ids.shape)} for prompts of {tuple(input_ids.shape)}")
    return torch.cat([input_ids, ids]), torch.cat([attention_mask, mask])
