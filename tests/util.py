"""Helpers shared by the tests: backends present, device moves, the float64 reference run."""
import numpy as np

from gpurnn import backend as _backend

BACKENDS = ["numpy"] + (["numba", "cupy"] if _backend.gpu_available() else ["cupy"] if _backend.cuda_host() else [])


def device_of(backend):
    """Where a backend's arrays live: "cpu" for numpy, and for cupy on the CPU harness (GPURNN_CUDA_HOST=1)."""
    return "cpu" if backend == "numpy" or (backend == "cupy" and _backend.cuda_host()) else "cuda"


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
