"""The model against a plain NumPy re-statement of the original's maths
(Haiku's LayerNorm, causal multi-head attention, GELU MLP, LSTM and vanilla
RNN cores), on a tiny symbolic model."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from eicl_cli.model import build_model, forward_batch
from test_model import N_CLASSES, tiny_cfg, tiny_inputs


def _np(x):
    return np.asarray(x, np.float64)


def _ln(x, norm):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * _np(norm.scale) + _np(norm.offset)


def _gelu(x):  # jax.nn.gelu's default (tanh) form, as Haiku's models call it
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _dense(x, d):
    return x @ _np(d.weight) + _np(d.bias)


def _tokens(model, examples, labels):
    h = _np(model.encoder.table)[examples]
    table = _np(model.tokenizer.label_table)
    seq = []
    for i in range(len(labels) - 1):
        seq += [h[i], table[labels[i]]]
    seq.append(h[-1])
    x = np.stack(seq)
    t, e = x.shape
    pos = np.arange(t)[:, None] / 30.0 ** (np.arange(0, e, 2)[None, :] / e)
    return x + np.concatenate([np.sin(pos), np.cos(pos)], -1)


def _reference_transformer(model, examples, labels, heads):
    x = _tokens(model, examples, labels)
    t, e = x.shape
    d = e // heads
    for i in range(model.core.num_layers):
        b = model.core.block(i)
        qkv = _dense(_ln(x, b.norm_attn), b.qkv)
        q, k, v = qkv[:, :e], qkv[:, e:2 * e], qkv[:, 2 * e:]
        out = np.zeros((t, e))
        for hh in range(heads):
            sl = slice(hh * d, (hh + 1) * d)
            s = q[:, sl] @ k[:, sl].T / np.sqrt(d)
            s = np.where(np.tril(np.ones((t, t))) > 0, s, -1e10)
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[:, sl] = w @ v[:, sl]
        x = x + _dense(out, b.out)
        x = x + _dense(_gelu(_dense(_ln(x, b.norm_mlp), b.mlp_in)), b.mlp_out)
    x = _ln(x, model.core.final_norm)
    return _dense(x, model.head)[::2]


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _reference_rnn(model, examples, labels, kind):
    x = _tokens(model, examples, labels)
    for layer in model.core.layers:
        outs = []
        if kind == "lstm":
            hid = layer.gates.weight.shape[1] // 4
            h, c = np.zeros(hid), np.zeros(hid)
            for xt in x:
                g = _dense(np.concatenate([xt, h]), layer.gates)
                i, cand, f, o = np.split(g, 4)
                c = _sigmoid(f + 1) * c + _sigmoid(i) * np.tanh(cand)
                h = _sigmoid(o) * np.tanh(c)
                outs.append(h)
        else:
            h = np.zeros(layer.hidden_to_hidden.weight.shape[0])
            for xt in x:
                h = np.maximum(_dense(xt, layer.input_to_hidden)
                               + _dense(h, layer.hidden_to_hidden), 0)
                outs.append(h)
        x = np.stack(outs)
    return _dense(x, model.head)[::2]


@pytest.mark.parametrize("kind", ["transformer", "lstm", "vanilla_rnn"])
def test_model_matches_numpy_reference(kind):
    cfg = tiny_cfg("embedding", kind)
    model, state = build_model(cfg, jax.random.PRNGKey(0), None)
    examples, labels = tiny_inputs(cfg, batch=2, seq_len=4)
    logits, _ = jax.jit(lambda ex, lab: forward_batch(model, state, ex, lab, key=None,
                                                      inference=True))(examples, labels)
    for b in range(2):
        ex, lab = np.asarray(examples[b]), np.asarray(labels[b])
        if kind == "transformer":
            ref = _reference_transformer(model, ex, lab, cfg.transformer.num_heads)
        else:
            ref = _reference_rnn(model, ex, lab, kind)
        assert ref.shape == (4, N_CLASSES)
        # A NumPy reference against XLA's program: layers of float32 sums
        # (attention, MLP, head) each ordered differently, 1e-7 per operation.
        np.testing.assert_allclose(np.asarray(logits[b]), ref, rtol=2e-4, atol=2e-5)
