"""FLOPs per token for Janus text-to-image, peak FLOPs by device, and MFU.

The formulas follow torchtitan's convention so that MFU figures are comparable
with large training codebases:

* training, per trained token:   ``6 * N + 12 * L * h * s``
* frozen forward, per token:     ``2 * N +  4 * L * h * s``  (teacher targets)
* rollout, per generated token:  ``2 * N +  4 * L * h * c``  (c = tokens in the KV cache),
  every row counted, so classifier-free guidance doubles it.

Here ``L`` is the number of decoder layers, ``h`` the attention width
(``num_attention_heads * head_dim``, the hidden size for Janus) and ``s`` the
sequence length of the forward pass. ``6 N`` is 2 FLOPs per multiply-add for the
forward pass and twice that for the backward pass (gradients with respect to
inputs and to weights). ``12 L h s`` is the attention score and value matmuls
(``Q K^T`` and ``P V``: 2 matmuls x 2 FLOPs x ``h`` x ``s`` per token and layer in
the forward pass, x3 with backward); like torchtitan it does not halve the
causal half that a fused kernel skips.

Which parameters make N, for a token on the text-to-image path of
``JanusForConditionalGeneration``:

* counted: every parameter of the language model's decoder layers (attention
  q/k/v/o, MLP gate/up/down, both RMSNorms; biases where the config has them),
  the language model's final norm, the image-token aligner
  (``model.generation_aligner``: ``embed_dim -> hidden`` then ``depth - 1`` more
  ``hidden -> hidden`` layers) and the image head (``model.generation_head``:
  ``proj_out`` and ``vision_head``, ``hidden -> codebook size``);
* not counted: embedding tables, which are lookups and no matmul
  (``language_model.embed_tokens`` and ``model.generation_embeddings``; torchtitan
  excludes its token embedding for the same reason), the text ``lm_head`` (an
  image token never goes through it), the SigLIP vision tower and its aligner
  (image understanding only) and the VQ model (it decodes tokens to pixels after
  sampling, outside the training and rollout FLOPs).

Every token is charged the full N, prompt tokens included, although a prompt
token's input skips the image aligner and its output skips the image head; the
two together are under 2 % of N at the 7B shape, and a uniform per-token cost is
what makes the figure comparable. For Janus-Pro-7B N = 6,172,229,632.

The 6N training convention assumes every weight gets a gradient. Erasure
fine-tunes a few layers, so :func:`executed_train_flops_per_token` also gives the
FLOPs the backward pass really performs (input gradients down to the lowest
trainable layer, weight gradients only for trainable weights); report both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = [
    "JanusFlopsShape",
    "janus_flops_shape",
    "train_flops_per_token",
    "frozen_forward_flops_per_token",
    "executed_train_flops_per_token",
    "rollout_flops",
    "peak_flops",
    "mfu",
    "PEAK_FLOPS",
]


@dataclass(frozen=True)
class JanusFlopsShape:
    """The numbers the FLOPs formulas need, with N split by module."""

    num_layers: int
    attention_width: int  # num_attention_heads * head_dim
    decoder_layer_params: int  # one decoder layer
    final_norm_params: int
    gen_aligner_params: int
    gen_head_params: int

    @property
    def decoder_params(self) -> int:
        """All decoder layers plus the final norm."""
        return self.num_layers * self.decoder_layer_params + self.final_norm_params

    @property
    def n_params(self) -> int:
        """N: the parameters on an image token's forward path (see the module docstring)."""
        return self.decoder_params + self.gen_aligner_params + self.gen_head_params


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def janus_flops_shape(config) -> JanusFlopsShape:
    """Read a transformers ``JanusConfig`` (Llama text config) into a :class:`JanusFlopsShape`.

    The counts are analytic, from the config alone; they match the parameter
    counts of the modules named in the module docstring exactly.
    """
    text = config.text_config
    vq = config.vq_config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    attn_bias = bool(getattr(text, "attention_bias", False))
    mlp_bias = bool(getattr(text, "mlp_bias", False))
    inter = text.intermediate_size

    attention = (
        _linear(hidden, heads * head_dim, attn_bias)  # q
        + 2 * _linear(hidden, kv_heads * head_dim, attn_bias)  # k, v
        + _linear(heads * head_dim, hidden, attn_bias)  # o
    )
    mlp = 2 * _linear(hidden, inter, mlp_bias) + _linear(inter, hidden, mlp_bias)  # gate, up; down
    norms = 2 * hidden  # input_layernorm and post_attention_layernorm (RMSNorm weight only)

    # generation_aligner: fc1 embed_dim -> projection_dim, then (depth - 1) projection_dim -> projection_dim
    aligner = _linear(vq.embed_dim, vq.projection_dim, True) + (vq.num_hidden_layers - 1) * _linear(
        vq.projection_dim, vq.projection_dim, True
    )
    # generation_head: proj_out image_token_embed_dim -> projection_dim, vision_head -> codebook
    head = _linear(vq.image_token_embed_dim, vq.projection_dim, True) + _linear(
        vq.projection_dim, vq.num_embeddings, True
    )
    return JanusFlopsShape(
        num_layers=text.num_hidden_layers,
        attention_width=heads * head_dim,
        decoder_layer_params=attention + mlp + norms,
        final_norm_params=hidden,
        gen_aligner_params=aligner,
        gen_head_params=head,
    )


def train_flops_per_token(shape: JanusFlopsShape, seq_len: int) -> int:
    """torchtitan's training FLOPs per token: ``6 N + 12 L h s`` (forward + full backward)."""
    return 6 * shape.n_params + 12 * shape.num_layers * shape.attention_width * seq_len


def frozen_forward_flops_per_token(shape: JanusFlopsShape, seq_len: int) -> int:
    """A forward pass with no backward (the teacher's targets): ``2 N + 4 L h s`` per token."""
    return 2 * shape.n_params + 4 * shape.num_layers * shape.attention_width * seq_len


def executed_train_flops_per_token(
    shape: JanusFlopsShape, seq_len: int, trainable_params: int, lowest_trainable_layer: int
) -> int:
    """Training FLOPs per token that a partly frozen model really executes.

    Forward ``2 N + 4 L h s``. Backward: input gradients (``2`` per parameter) flow
    from the image head down through decoder layers ``lowest_trainable_layer ..
    L-1`` and stop there, weight gradients (``2`` per parameter) exist only for the
    ``trainable_params``; the attention matmuls of those layers cost ``8 h s`` each
    in backward. With every layer trainable (``lowest_trainable_layer=0``,
    ``trainable_params=N``) this is the 6N formula minus the aligner's input
    gradient, which no one needs.
    """
    if not 0 <= lowest_trainable_layer < shape.num_layers:
        raise ValueError(
            f"lowest_trainable_layer: expected 0..{shape.num_layers - 1}, got {lowest_trainable_layer}"
        )
    layers_in_backward = shape.num_layers - lowest_trainable_layer
    input_grad_params = (
        layers_in_backward * shape.decoder_layer_params + shape.final_norm_params + shape.gen_head_params
    )
    attn = shape.num_layers * shape.attention_width * seq_len
    attn_backward = layers_in_backward * shape.attention_width * seq_len
    return 2 * shape.n_params + 4 * attn + 2 * input_grad_params + 2 * trainable_params + 8 * attn_backward


def rollout_flops(
    shape: JanusFlopsShape,
    prompt_len: int,
    num_image_tokens: int,
    batch_size: int = 1,
    guided: bool = True,
    include_prefill: bool = True,
) -> int:
    """FLOPs to sample ``num_image_tokens`` for ``batch_size`` prompts with a KV cache.

    Generated token ``i`` (0-based) attends to ``c = prompt_len + i`` cached tokens
    and costs ``2 N + 4 L h c``. The prefill of the prompt costs ``prompt_len``
    frozen-forward tokens (``2 N + 4 L h prompt_len`` each) when
    ``include_prefill``. Classifier-free guidance runs a conditional and an
    unconditional row per prompt, so ``guided`` doubles everything.
    """
    lh = shape.num_layers * shape.attention_width
    # sum_{i=0}^{G-1} (prompt_len + i) = G * prompt_len + G (G - 1) / 2
    cached = num_image_tokens * prompt_len + num_image_tokens * (num_image_tokens - 1) // 2
    decode = 2 * shape.n_params * num_image_tokens + 4 * lh * cached
    prefill = prompt_len * frozen_forward_flops_per_token(shape, prompt_len) if include_prefill else 0
    rows = batch_size * (2 if guided else 1)
    return rows * (decode + prefill)


# --------------------------------------------------------------------------- peak FLOPs

# Dense (no structured sparsity) peak FLOP/s from the vendors' datasheets, per GPU.
# "float32" is the non-tensor-core FP32 rate (torch's default for fp32 matmul);
# "tf32" applies when torch.backends.cuda.matmul.allow_tf32 is set.
# Matching is by substring of torch.cuda.get_device_name(), first match wins, so
# the more specific names come first.
PEAK_FLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H100", "NVL"), {"bfloat16": 835e12, "float16": 835e12, "tf32": 417.5e12, "float32": 60e12}),
    (("H100", "PCIE"), {"bfloat16": 756e12, "float16": 756e12, "tf32": 378e12, "float32": 51e12}),
    # H100 SXM reports itself as e.g. "NVIDIA H100 80GB HBM3"
    (("H100",), {"bfloat16": 989e12, "float16": 989e12, "tf32": 494.5e12, "float32": 67e12}),
    (("H200", "NVL"), {"bfloat16": 835e12, "float16": 835e12, "tf32": 417.5e12, "float32": 60e12}),
    (("H200",), {"bfloat16": 989e12, "float16": 989e12, "tf32": 494.5e12, "float32": 67e12}),
    (("H800",), {"bfloat16": 989e12, "float16": 989e12, "tf32": 494.5e12, "float32": 67e12}),
    (("B200",), {"bfloat16": 2250e12, "float16": 2250e12}),
    (("A100",), {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
    (("A800",), {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
    (("L40S",), {"bfloat16": 362e12, "float16": 362e12, "tf32": 183e12, "float32": 91.6e12}),
    (("L40",), {"bfloat16": 181e12, "float16": 181e12, "tf32": 90.5e12, "float32": 90.5e12}),
    (("L4",), {"bfloat16": 121e12, "float16": 121e12, "tf32": 60e12, "float32": 30.3e12}),
    (("A10G",), {"bfloat16": 70e12, "float16": 70e12, "tf32": 35e12, "float32": 31.2e12}),
    (("MI300X",), {"bfloat16": 1307e12, "float16": 1307e12, "float32": 163.4e12}),
]

_DTYPE_ALIASES = {
    "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
    "fp16": "float16", "half": "float16", "torch.float16": "float16",
    "fp32": "float32", "float": "float32", "torch.float32": "float32",
}


def peak_flops(device_name: str, dtype) -> Optional[float]:
    """Dense peak FLOP/s of one device for ``dtype``, or None when unknown.

    ``device_name`` is what ``torch.cuda.get_device_name()`` returns; ``dtype`` a
    torch dtype or a name (bfloat16/bf16, float16/fp16, tf32, float32/fp32). CPUs
    return None: their peak depends on core count, vector ISA and clock under
    load, and no table gives it honestly, so MFU on CPU is reported as n/a.
    """
    key = str(dtype).lower()
    key = _DTYPE_ALIASES.get(key, key)
    name = device_name.upper()
    if name == "CPU" or name.startswith("CPU"):
        return None
    for needles, by_dtype in PEAK_FLOPS:
        if all(n in name for n in needles):
            return by_dtype.get(key)
    return None


def mfu(flops_per_s: Optional[float], peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation as a fraction (0..1), or None when the peak is unknown."""
    if flops_per_s is None or not peak:
        return None
    return flops_per_s / peak
