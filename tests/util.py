"""Helpers shared by the tests: backends present, device moves, the float64 reference run."""
import numpy as np

from gpurnn import backend as _backend

BACKENDS = ["numpy"] + (["numba", "cupy"] if _backend.gpu_available() else ["cupy"] if _backend.cuda_host() else [])
# every backend whose own kernels run here, the numba simulator included (slow: for small problems only)
KERNEL_BACKENDS = ["numpy"] + (["numba"] if _backend.gpu_available() or _backend.cuda_simulator() else []) + \
    (["cupy"] if _backend.gpu_available() or _backend.cuda_host() else [])


def device_of(backend):
    """Where a backend's arrays live: "cpu" for numpy, for cupy on the CPU harness (GPURNN_CUDA_HOST=1) and for
    numba in its simulator (NUMBA_ENABLE_CUDASIM=1); "cuda" otherwise."""
    on_host = {"numpy": True, "cupy": _backend.cuda_host(), "numba": _backend.cuda_simulator()}
    return "cpu" if on_host[backend] else "cuda"


def to_device(a, backend):
    """A NumPy array (or tuple of them) on the backend's device."""
    if isinstance(a, tuple):
        return tuple(to_device(x, backend) for x in a)
    return a if a is None or device_of(backend) == "cpu" else _backend.xp_for("cuda").asarray(a)


def to_numpy(a):
    if isinstance(a, tuple):
        return tuple(to_numpy(x) for x in a)
    return a.get() if hasattr(a, "get") else np.asarray(a)


CELLS = ("rnn_tanh", "rnn_relu", "rnn_sigmoid", "lstm", "gru")


def make_layer(cell, input_size, hidden_size, **kwargs):
    """The gpurnn layer for a cell name ("rnn_tanh", ..., "lstm", "gru")."""
    import gpurnn
    if cell.startswith("rnn_"):
        return gpurnn.RNN(input_size, hidden_size, nonlinearity=cell[4:], **kwargs)
    return {"lstm": gpurnn.LSTM, "gru": gpurnn.GRU}[cell](input_size, hidden_size, **kwargs)


def random_problem(layer, T, B, rng, ragged=False):
    """x, state0, lengths, dy, dstate for a layer: random data in the layer's dtype (lengths None unless ragged)."""
    D, L, H = layer.num_directions, layer.num_layers, layer.hidden_size
    dt = layer.dtype
    x = rng.standard_normal((B, T, layer.input_size) if layer.batch_first else (T, B, layer.input_size)).astype(dt)
    P = getattr(layer, "state_size", H)                   # h's size (an LSTM's proj_size), c's is H
    lstm = layer.cell == "lstm"
    shapes = [(L * D, B, P)] + ([(L * D, B, H)] if lstm else [])
    state = tuple(rng.standard_normal(shape).astype(dt) for shape in shapes)
    dstate = tuple(rng.standard_normal(shape).astype(dt) for shape in shapes)
    lengths = rng.integers(1, T + 1, size=B) if ragged else None
    if ragged:
        lengths[0] = T
    y_shape = (B, T, D * P) if layer.batch_first else (T, B, D * P)
    dy = rng.standard_normal(y_shape).astype(dt)
    unpack = (lambda s: s) if lstm else (lambda s: s[0])
    return x, unpack(state), lengths, dy, unpack(dstate)


def on_layer_device(a, layer):
    """A NumPy array (or a tuple of them, or None) on the layer's device."""
    if isinstance(a, tuple):
        return tuple(on_layer_device(x, layer) for x in a)
    return None if a is None else layer.xp.asarray(a)


def layer_outputs(layer, x, state, lengths, dy, dstate, retain=False):
    """Everything one forward and backward of `layer` (on its device; NumPy inputs moved there) give, as NumPy
    arrays by name: y, h_n (c_n), dx, dh0 (dc0) and each parameter's gradient (after zero_grad). The names
    torch_oracle.run uses."""
    move = lambda a: on_layer_device(a, layer)  # noqa: E731
    layer.zero_grad()
    y, state_n, ctx = layer.forward(move(x), move(state), lengths, retain=retain)
    dx, dstate0 = layer.backward(ctx, move(dy), move(dstate))
    as_tuple = lambda s: s if isinstance(s, tuple) else (s,)  # noqa: E731
    out = {"y": to_numpy(y), **dict(zip(("h_n", "c_n"), to_numpy(as_tuple(state_n)))), "dx": to_numpy(dx),
           **dict(zip(("dh0", "dc0"), to_numpy(as_tuple(dstate0))))}
    out.update({k: to_numpy(g) for k, g in layer.grads.items()})
    return out


def numeric_grad(loss, arr, eps=1e-6):
    """Central differences of loss() with respect to every entry of arr (perturbed in place)."""
    grad = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        keep = arr[idx]
        arr[idx] = keep + eps
        up = loss()
        arr[idx] = keep - eps
        down = loss()
        arr[idx] = keep
        grad[idx] = (up - down) / (2 * eps)
    return grad


def assert_same(a, b):
    """Equal values of the same types, nested (tuples stay tuples, arrays keep dtype and shape; nan equals nan)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, (dict, list, tuple)):
        assert type(b) is type(a) and len(a) == len(b)
        for k in (a if isinstance(a, dict) else range(len(a))):
            assert_same(a[k], b[k])
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b)
    else:
        assert a == b and type(a) is type(b) or isinstance(a, np.generic) and a.item() == b


def as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def check_layer_gradients(layer, x, state, lengths, dy, dstate):
    """layer.backward's gradients of L = <y, dy> + <state_n, dstate> against central differences of L, every
    forward in training mode with the same random draws (dropout, zoneout and weight_drop masks): the layer's
    generator is re-seeded before each."""
    rng_state = layer.rng.bit_generator.state

    def forward():
        layer.rng.bit_generator.state = rng_state
        return layer.forward(x, state, lengths, training=True)

    def loss():
        y, state_n, _ = forward()
        return float((y * dy).sum() + sum((s * d).sum() for s, d in zip(as_tuple(state_n), as_tuple(dstate))))

    _, _, ctx = forward()
    dx, dstate0 = layer.backward(ctx, dy, dstate)
    for name, p in layer.params.items():
        np.testing.assert_allclose(layer.grads[name], numeric_grad(loss, p), rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7, err_msg="x")
    for i, (s, ds) in enumerate(zip(as_tuple(state), as_tuple(dstate0))):
        np.testing.assert_allclose(ds, numeric_grad(loss, s), rtol=1e-5, atol=1e-7, err_msg=f"state[{i}]")
