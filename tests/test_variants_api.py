"""The variants' API: options checked (ValueError/TypeError naming the argument, nothing built), configs, build_model
and checkpoints round-trip them, and the GPU backends that lack a variant refuse it by name, changing nothing."""
import numpy as np
import pytest

import gpurnn
from gpurnn import backend as backends
from gpurnn.models import build_model
from util import random_problem

CLASSES = [gpurnn.LSTM, gpurnn.GRU, gpurnn.RNN, gpurnn.LayerNormLSTM, gpurnn.LayerNormGRU]


@pytest.mark.parametrize("cls,kwargs,error,words", [
    (gpurnn.LSTM, dict(zoneout=1.0), ValueError, "zoneout"),
    (gpurnn.GRU, dict(zoneout=-0.1), ValueError, "zoneout"),
    (gpurnn.RNN, dict(zoneout="0.1"), TypeError, "zoneout"),
    (gpurnn.LSTM, dict(zoneout=(0.1, 0.2, 0.3)), ValueError, "zoneout"),
    (gpurnn.LSTM, dict(zoneout=(0.1, 1.5)), ValueError, "zoneout[1]"),
    (gpurnn.GRU, dict(zoneout=(0.1, 0.2)), TypeError, "zoneout"),
    (gpurnn.LayerNormGRU, dict(weight_drop=1.0), ValueError, "weight_drop"),
    (gpurnn.LSTM, dict(memory="disk"), ValueError, "memory"),
    (gpurnn.LSTM, dict(segment_steps=0), ValueError, "segment_steps"),
    (gpurnn.LSTM, dict(proj_size=4), ValueError, "proj_size"),
    (gpurnn.LSTM, dict(proj_size=-1), ValueError, "proj_size"),
    (gpurnn.GRU, dict(proj_size=2), ValueError, "proj_size"),
    (gpurnn.RNN, dict(proj_size=2), ValueError, "proj_size"),
])
def test_bad_options_are_refused(cls, kwargs, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        cls(3, 4, **kwargs)


@pytest.mark.parametrize("cls", CLASSES)
def test_config_round_trips(cls, tmp_path):
    options = dict(zoneout=0.2, weight_drop=0.1, memory="checkpoint", segment_steps=3, num_layers=2,
                   bidirectional=True)
    if cls in (gpurnn.LSTM, gpurnn.LayerNormLSTM):
        options.update(zoneout=(0.2, 0.4), proj_size=2)
    layer = cls(3, 4, seed=0, **options)
    clone = build_model(layer.config)
    assert type(clone) is cls and clone.config == layer.config
    assert sorted(clone.params) == sorted(layer.params)
    layer.save(tmp_path / "layer.npz")
    back = gpurnn.load(tmp_path / "layer.npz")
    assert back.config == layer.config
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v)


def test_layer_norm_parameters():
    layer = gpurnn.LayerNormLSTM(3, 4, bidirectional=True, seed=0)
    for suffix in ("_l0", "_l0_reverse"):
        np.testing.assert_array_equal(layer.params[f"gamma_ih{suffix}"], np.ones(16, np.float32))
        np.testing.assert_array_equal(layer.params[f"gamma_hh{suffix}"], np.ones(16, np.float32))
        np.testing.assert_array_equal(layer.params[f"gamma_c{suffix}"], np.ones(4, np.float32))
        np.testing.assert_array_equal(layer.params[f"beta_c{suffix}"], np.zeros(4, np.float32))
    assert sorted(k for k in gpurnn.LayerNormGRU(3, 4).params if "gamma" in k or "beta" in k) == \
        ["gamma_hh_l0", "gamma_ih_l0"]
    assert gpurnn.LSTM(3, 4, seed=0).state_dict().keys() <= layer.state_dict().keys()


@pytest.mark.parametrize("cell", ["lstm", "lnlstm", "lngru", "gru"])
def test_models_take_the_options(cell, tmp_path):
    proj = 3 if cell in ("lstm", "lnlstm") else 0
    model = gpurnn.models.CharLM("abcd\n", hidden_size=6, cell=cell, embedding_dim=4, zoneout=0.1, weight_drop=0.2,
                                 proj_size=proj, memory="checkpoint", seed=0)
    assert model.rnn.zoneout == 0.1 and model.rnn.weight_drop == 0.2 and model.rnn.proj_size == proj
    assert model.head.params["weight"].shape == (5, proj or 6)
    ids = np.random.default_rng(0).integers(0, 5, (9, 2))
    out, state, ctx = model(ids)
    model.backward(ctx, np.ones_like(out))
    model.save(tmp_path / "m.npz")
    back = gpurnn.load(tmp_path / "m.npz")
    assert back.config == model.config and back.rnn.memory == "checkpoint"
    np.testing.assert_array_equal(back.eval()(ids)[0], model.eval()(ids)[0])
    assert len(model.sample(5, prime="ab")) == 5


@pytest.mark.parametrize("kind", ["Generator", "Seq2Seq", "Classifier"])
def test_projected_state_through_the_other_models(kind):
    kwargs = dict(cell="lnlstm", proj_size=2, zoneout=(0.1, 0.3), seed=0)
    rng = np.random.default_rng(0)
    if kind == "Generator":
        model = gpurnn.models.Generator(3, 5, 4, **kwargs)
        out, _, ctx = model(rng.standard_normal((2, 3)).astype(np.float32), rng.integers(0, 4, (6, 2)))
    elif kind == "Seq2Seq":
        model = gpurnn.models.Seq2Seq(5, 4, 5, **kwargs)
        out, _, ctx = model(rng.integers(0, 5, (4, 2)), rng.integers(0, 4, (6, 2)))
    else:
        model = gpurnn.models.Classifier(3, 5, 4, **kwargs)
        out, _, ctx = model(rng.standard_normal((6, 2, 3)).astype(np.float32))
    model.backward(ctx, np.ones_like(out))
    assert all(np.isfinite(g).all() for m in model.modules() for g in m.grads.values())
    assert build_model(model.config).config == model.config


def test_wrong_state_shapes_with_a_projection():
    layer = gpurnn.LSTM(3, 4, proj_size=2)
    x = np.zeros((2, 1, 3), np.float32)
    with pytest.raises(ValueError, match=r"state\[h\] must have shape \(1, 1, 2\)"):
        layer.forward(x, (np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32)))
    with pytest.raises(ValueError, match=r"state\[c\] must have shape \(1, 1, 4\)"):
        layer.forward(x, (np.zeros((1, 1, 2), np.float32), np.zeros((1, 1, 2), np.float32)))


@pytest.mark.parametrize("cls,kwargs,words", [
    (gpurnn.LayerNormLSTM, {}, "LayerNormLSTM"), (gpurnn.LayerNormGRU, {}, "LayerNormGRU"),
    (gpurnn.GRU, dict(zoneout=0.1), "zoneout"), (gpurnn.LSTM, dict(proj_size=2), "proj_size"),
    (gpurnn.LSTM, dict(memory="checkpoint"), "checkpoint")])
def test_a_backend_without_a_variant_refuses_it(monkeypatch, cls, kwargs, words):
    """A kernel module whose FEATURES lack a variant (here the numpy backend's, its FEATURES emptied) is refused
    by name before any work, the layer's generator untouched."""
    monkeypatch.setattr(backends.kernels("numpy"), "FEATURES", frozenset())
    layer = cls(3, 4, backend="numpy", seed=0, **kwargs)
    rng_state = layer.rng.bit_generator.state
    with pytest.raises(ValueError, match=f"{words}.* is not implemented on backend 'numpy' yet"):
        layer.forward(np.zeros((2, 1, 3), np.float32))
    assert layer.rng.bit_generator.state == rng_state


@pytest.mark.skipif(not backends.cuda_host(), reason="the cupy backend on the CPU needs GPURNN_CUDA_HOST=1")
def test_weight_drop_runs_on_the_cupy_kernels():
    """DropConnect is the layer's: W_hh * mask reaches any backend's sweep, with the numpy backend's masks."""
    results = []
    for name in ("numpy", "cupy"):
        layer = gpurnn.GRU(3, 4, weight_drop=0.4, dtype="float64", backend=name, seed=1)
        problem = random_problem(layer, T=5, B=2, rng=np.random.default_rng(0), ragged=True)
        x, state, lengths, dy, dstate = problem
        y, _, ctx = layer.forward(x, state, lengths)
        dx, _ = layer.backward(ctx, dy, dstate)
        results.append([y, dx] + [layer.grads[k] for k in sorted(layer.grads)])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
