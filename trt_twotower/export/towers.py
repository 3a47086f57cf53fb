"""The step graphs of both towers, assembled layer by layer (names from ``trt_twotower.names``).

Each layer reads only its own weights through ``w`` just before it is emitted, so a graph is
written while one layer's tensors are in memory.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..config import ATTENTION, MAMBA, MLP, MOE, TwoTowerConfig
from .. import names
from ..names import INT64, MODEL
from .attention import block_attention, context_attention, PLUGIN
from .common import cast_float, cast_model, linear, modulate, reshape, rms_norm, silu, unsqueeze
from .graph import CUSTOM_DOMAIN, GraphBuilder, Value
from .mamba import mamba_mixer
from .moe import mlp, moe
from ..reference.timestep import FREQUENCY_DIM, MAX_PERIOD, sinusoid_frequencies

Weights = Callable[[str], torch.Tensor]
LAYER_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MOE: "moe", MLP: "mlp"}
MASK_LOGIT = -1e12                        # spec §5.1, as in trt_twotower.policy


def _inputs(g: GraphBuilder, specs: list[names.TensorSpec]) -> dict[str, Value]:
    return {spec.name: g.input(spec) for spec in specs}


def _mixer_ffn(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, kind: str,
               h: Value) -> Value:
    return moe(g, c, w, prefix, h) if kind == MOE else mlp(g, c, w, prefix, h)


def context_step_graph(g: GraphBuilder, c: TwoTowerConfig, w: Weights, max_context: int,
                       on_layer: Callable[[int], None] = lambda i: None) -> None:
    """Consume T tokens after each row's ``past_length``: last-position logits, the updated
    KV caches and the new Mamba states (spec §2.2, §4.6)."""
    specs_in, specs_out = names.context_step_io(c, max_context)
    x = _inputs(g, specs_in)
    out_specs = {s.name: s for s in specs_out}
    hidden = g.op("Gather", g.weight("context_tower.embeddings.weight",
                                     w("context_tower.embeddings.weight")), x["input_ids"])
    for i, kind in enumerate(c.layer_types):
        prefix = f"context_tower.layers.{i}."
        g.scope = f"context.layers.{i}.{LAYER_NAMES[kind]}"
        h = rms_norm(g, hidden, w(prefix + "norm.weight"), prefix + "norm.weight",
                     c.layer_norm_epsilon)
        if kind == MAMBA:
            h, conv, ssm = mamba_mixer(g, c, w, prefix + "mixer.", h, x[names.conv_state(i)],
                                       x[names.ssm_state(i)])
            g.output(conv, out_specs[names.new_conv_state(i)])
            g.output(ssm, out_specs[names.new_ssm_state(i)])
        elif kind == ATTENTION:
            h, k, v = context_attention(g, c, w, prefix + "mixer.", h, x["past_length"],
                                        x[names.past_key(i)], x[names.past_value(i)], max_context,
                                        names.present_key(i), names.present_value(i))
            g.output(k, out_specs[names.present_key(i)])
            g.output(v, out_specs[names.present_value(i)])
        else:
            h = _mixer_ffn(g, c, w, prefix + "mixer.", kind, h)
        hidden = g.op("Add", hidden, h)
        on_layer(i)
    g.scope = "context.head"
    last_index = g.op("Sub", g.op("Squeeze", g.op("Shape", x["input_ids"], start=1, end=2)),
                      g.const(1, INT64))
    last = g.op("Gather", hidden, last_index, axis=1)                        # [B, hidden]
    last = rms_norm(g, last, w("context_tower.norm_f.weight"), "context_tower.norm_f.weight",
                    c.layer_norm_epsilon)
    logits = linear(g, last, w("context_lm_head.weight"), "context_lm_head.weight")
    g.output(cast_float(g, logits), out_specs["logits"])


def time_embedding(g: GraphBuilder, c: TwoTowerConfig, w: Weights, t: Value) -> Value:
    """t [B] → [B, 3, hidden]: t·1000 in the model dtype, sinusoid in fp32 (spec §4.1)."""
    scaled = cast_float(g, g.op("Mul", cast_model(g, t), g.const(MAX_PERIOD, MODEL)))
    freqs = sinusoid_frequencies(FREQUENCY_DIM).numpy()[None]
    args = g.op("Mul", unsqueeze(g, scaled, [1]), g.const(freqs))
    features = cast_model(g, g.op("Concat", g.op("Cos", args), g.op("Sin", args), axis=-1))
    t_repr = linear(g, features, w("t_embedder.mlp.0.weight"), "t_embedder.mlp.0.weight",
                    w("t_embedder.mlp.0.bias"))
    t_repr = linear(g, silu(g, t_repr), w("t_embedder.mlp.2.weight"), "t_embedder.mlp.2.weight",
                    w("t_embedder.mlp.2.bias"))
    t_emb = linear(g, silu(g, t_repr), w("t_block.1.weight"), "t_block.1.weight",
                   w("t_block.1.bias"))
    return reshape(g, t_emb, [0, 3, c.hidden_size])


def adaln_switch(g: GraphBuilder, modulated: Value, shift: Value, scale: Value, gate: Value
                 ) -> tuple[Value, Value, Value]:
    """Rows with ``modulated`` false get shift 0, scale 0 and gate 1: x·(1 + 0) + 0 and 1·h
    are exact in floating point, so such a row computes the unmodulated forward mock-AR runs
    (spec §5.2) bit for bit, and one graph (one copy of the weights) serves every step."""
    row = unsqueeze(g, modulated, [1, 2])                                   # [B, 1, 1]
    zero, one = g.const(0.0, MODEL), g.const(1.0, MODEL)
    return (g.op("Where", row, shift, zero), g.op("Where", row, scale, zero),
            g.op("Where", row, gate, one))


def denoiser_step_graph(g: GraphBuilder, c: TwoTowerConfig, w: Weights, max_context: int,
                        lowering: str, on_layer: Callable[[int], None] = lambda i: None) -> None:
    """The denoiser over a block (spec §4.2–§4.5): its logits and, through the confidence-
    unmask op, the greedy next block; rows with ``modulated`` false run unmodulated."""
    specs_in, specs_out = names.denoiser_step_io(c, max_context)
    x = _inputs(g, specs_in)
    out_specs = {s.name: s for s in specs_out}
    g.scope = "denoiser.time"
    t_emb = time_embedding(g, c, w, x["t"])
    hidden = g.op("Gather", g.weight("denoiser_tower.embeddings.weight",
                                     w("denoiser_tower.embeddings.weight")), x["block_ids"])
    for i, kind in enumerate(c.layer_types):
        prefix = f"denoiser_tower.layers.{i}."
        g.scope = f"denoiser.layers.{i}.{LAYER_NAMES[kind]}"
        norm_w = w(prefix + "norm.weight")

        def norm(v: Value) -> Value:
            return rms_norm(g, v, norm_w, prefix + "norm.weight", c.layer_norm_epsilon)

        table = g.weight(f"scale_shift_tables.{i}", w(f"scale_shift_tables.{i}"))
        shift, scale, gate = adaln_switch(g, x["modulated"], *g.op(
            "Split", g.op("Add", t_emb, table), axis=1, outputs=3, num_outputs=3))
        h = (norm(modulate(g, hidden, shift, scale)) if kind in (MAMBA, ATTENTION)
             else modulate(g, norm(hidden), shift, scale))
        if kind == MAMBA:
            h, _, _ = mamba_mixer(g, c, w, prefix + "mixer.", h, x[names.conv_state(i)],
                                  x[names.ssm_state(i)])
        elif kind == ATTENTION:
            h = block_attention(g, c, w, prefix + "mixer.", h, x["past_length"],
                                x[names.past_key(i)], x[names.past_value(i)], max_context,
                                lowering)
        else:
            h = _mixer_ffn(g, c, w, prefix + "mixer.", kind, h)
        hidden = g.op("Add", hidden, g.op("Mul", gate, h))
        on_layer(i)
    g.scope = "denoiser.head"
    hidden = rms_norm(g, hidden, w("denoiser_tower.norm_f.weight"),
                      "denoiser_tower.norm_f.weight", c.layer_norm_epsilon)
    logits = cast_float(g, linear(g, hidden, w("lm_head.weight"), "lm_head.weight"))
    g.output(logits, out_specs["logits"])
    if lowering == PLUGIN:
        nxt, conf, count = g.op("ConfidenceUnmask", logits, x["block_ids"],
                                x["confidence_threshold"], x["steps_left"], outputs=3,
                                domain=CUSTOM_DOMAIN, hint="confidence_unmask",
                                mask_token_id=c.mask_token_id)
    else:
        nxt, conf, count = confidence_unmask(g, logits, x["block_ids"],
                                             x["confidence_threshold"], x["steps_left"],
                                             c.mask_token_id, c.vocab_size)
    for value, name in ((nxt, "next_block"), (conf, "confidence"), (count, "masked_count")):
        g.output(value, out_specs[name])


def confidence_unmask(g: GraphBuilder, logits: Value, block: Value, threshold: Value,
                      steps_left: Value, mask_token_id: int, vocab: int
                      ) -> tuple[Value, Value, Value]:
    """The greedy commit rule of ``policy.commit_step`` in standard ONNX ops, with γ and the
    steps left per row ([B])."""
    is_mask_column = np.zeros(vocab, dtype=bool)
    is_mask_column[mask_token_id] = True
    masked_logits = g.op("Where", g.const(is_mask_column, "bool"), g.const(MASK_LOGIT), logits)
    pred = g.op("ArgMax", masked_logits, axis=-1, keepdims=0)
    peak = g.op("ReduceMax", masked_logits, g.const([-1], INT64), keepdims=1)
    total = g.op("ReduceSum", g.op("Exp", g.op("Sub", masked_logits, peak)),
                 g.const([-1], INT64), keepdims=0)
    prob = g.op("Reciprocal", total)                                          # [B, S]
    masked = g.op("Equal", block, g.const(mask_token_id, INT64))
    conf = g.op("Where", masked, prob, g.const(np.inf))

    def count(flags: Value) -> Value:
        return g.op("ReduceSum", g.op("Cast", flags, to=7), g.const([-1], INT64), keepdims=0)

    n = count(masked)
    row_threshold = unsqueeze(g, threshold, [1])                              # [B, 1]
    above = g.op("Max", count(g.op("And", g.op("Greater", conf, row_threshold), masked)),
                 g.const(1, INT64))
    steps = g.op("Max", steps_left, g.const(1, INT64))
    min_commit = g.op("Div", g.op("Sub", g.op("Add", n, steps), g.const(1, INT64)), steps)
    commits = g.op("Min", g.op("Max", above, min_commit), n)
    commits = g.op("Where", g.op("LessOrEqual", steps_left, g.const(1, INT64)), n, commits)
    ranking_key = g.op("Where", masked, conf, g.const(-np.inf))
    width = g.op("Shape", block, start=1, end=2)
    _, order = g.op("TopK", ranking_key, width, axis=-1, largest=1, sorted=1, outputs=2)
    positions = g.op("Expand", g.op("Range", g.const(0, INT64), g.op("Squeeze", width),
                                    g.const(1, INT64)), g.op("Shape", block))
    rank = g.op("ScatterElements", positions, order, positions, axis=1)
    commit = g.op("And", masked, g.op("Less", rank, unsqueeze(g, commits, [1])))
    next_block = g.op("Where", commit, pred, block)
    remaining = count(g.op("Equal", next_block, g.const(mask_token_id, INT64)))
    return next_block, conf, remaining
