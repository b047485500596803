"""The two ways a step reaches the math (``specs/adapters-tensorflow.md`` §3), on each
Keras backend:

* the *host* path: the present variables' arrays go to :class:`~.bridge.CoreBridge` (the
  core classes on flat NumPy buffers, bit-identical to the core API). On TensorFlow through
  one ``tf.numpy_function`` (graph and eager), on torch directly (its tensors are host
  memory on the CPU);
* the *native* path: :func:`~.native.native_step` (the reference on ``jax.numpy``), called
  directly on the JAX backend and as TensorFlow ops (``jax2tf``) on TensorFlow, so XLA
  compiles it with the model and it runs on the variables' device.

Each function takes the optimizer, the sorted indices of the present variables, their dense
gradients and the learning rate, and assigns the results to the Keras variables.
"""

from __future__ import annotations

import functools

import keras
import numpy as np

from upgd_ref.hyperparams import segment_hyperparams

from .native import native_step

_SCALAR_TYPES = ["int64", "float64", "int64", "int64", "float64", "float64"]


def _state_lists(opt, indices):
    """The present variables and their state variables, and the six scalar state variables."""
    moments = opt._bridge.moments

    def pick(xs):
        return [xs[k] for k in indices]

    variables = pick(opt._trainable_variables)
    utility = pick(opt._utility)
    first = pick(opt._first_moment) if moments else []
    second = pick(opt._second_moment) if moments else []
    return variables, utility, first, second, list(opt.scalar_variables())


def host_graph_step(opt, indices, dense, learning_rate):
    """TensorFlow: one ``tf.numpy_function`` into the bridge, its outputs assigned."""
    import tensorflow as tf

    bridge = opt._bridge
    variables, utility, first, second, scalars = _state_lists(opt, indices)
    inputs = [tf.cast(tf.convert_to_tensor(learning_rate), tf.float64)]
    inputs += [tf.convert_to_tensor(v) for v in (*variables, *dense, *utility, *first, *second, *scalars)]
    dtype, state = bridge.layout.dtype.name, bridge.state_layout.dtype.name
    out_types = [dtype] * len(indices) + [state] * ((3 if bridge.moments else 1) * len(indices)) + _SCALAR_TYPES

    def run(lr, *arrays):
        # Runs at step time (also in graph mode): attribute edits and schedules apply.
        lr = opt._exact_if_unchanged(float(lr))
        return bridge.step(indices, opt._param_groups(), opt.vgs, lr, *arrays)

    outputs = tf.numpy_function(run, inputs, [tf.as_dtype(t) for t in out_types], stateful=True,
                                name="upgd_ref_core_step")
    targets = [*variables, *utility, *first, *second, *scalars]
    for target, value in zip(targets, outputs):
        value.set_shape(target.shape)
        target.assign(value)
    if not tf.executing_eagerly():
        # In a graph, Keras's ``iterations.assign_add(1)`` (after this method) shares no
        # data with the step and could run even when the core raised. An op on the same
        # variable that waits for the step orders it after the step (tf.function keeps
        # program order per resource), so a failed step leaves ``iterations`` unchanged.
        with tf.control_dependencies(outputs):
            opt._iterations.assign_add(tf.zeros((), dtype=opt._iterations.dtype))


def host_eager_step(opt, indices, dense, learning_rate):
    """torch (eager, host memory): the bridge on NumPy views, its outputs assigned."""
    variables, utility, first, second, scalars = _state_lists(opt, indices)
    arrays = [keras.ops.convert_to_numpy(v) for v in (*variables, *dense, *utility, *first, *second, *scalars)]
    lr = opt._exact_if_unchanged(float(keras.ops.convert_to_numpy(learning_rate)))
    outputs = opt._bridge.step(indices, opt._param_groups(), opt.vgs, lr, *arrays)
    for target, value in zip([*variables, *utility, *first, *second, *scalars], outputs):
        target.assign(np.asarray(value, dtype=keras.backend.standardize_dtype(target.dtype)))


def _native_settings(opt, present):
    """The static arguments of :func:`~.native.native_step` (read when the step is traced)."""
    layout = opt._bridge.layout
    groups = [dict(g, lr=0.0) for g in opt._param_groups()]  # lr: the traced value, set in the step
    hyper = [opt._MEMBER.tie({k: v for k, v in h.items() if k != "lr"})
             for h in segment_hyperparams(groups, layout.num_segments)]
    return dict(present=present, hyper=hyper, vgs=opt.vgs, seed=opt.seed, noise_norm=opt.noise_norm,
                variant=opt.variant, words=keras.backend.backend() == "jax", exact_lr=opt._exact_rate())


def native_graph_step(opt, indices, dense, learning_rate):
    """The native step over every variable (absent ones unchanged), its outputs assigned."""
    n = len(opt._trainable_variables)
    everything = list(range(n))
    variables, utility, first, second, scalars = _state_lists(opt, everything)
    grads = [None] * n
    for i, g in zip(indices, dense):
        grads[i] = g
    present = [g is not None for g in grads]
    grads = [g if g is not None else v.value for g, v in zip(grads, variables)]  # absent: never read
    step = functools.partial(native_step, **_native_settings(opt, present))
    groups = [[v.value for v in variables], grads, [u.value for u in utility], [m.value for m in first],
              [m.value for m in second], [s.value for s in scalars]]
    if keras.backend.backend() == "tensorflow":
        outputs = _through_tensorflow(step, learning_rate, groups)
    else:
        outputs = step(learning_rate, *groups)
    new_values, new_utility, new_first, new_second, new_scalars, _ = outputs
    for targets, results in zip((variables, utility, first, second, scalars),
                                (new_values, new_utility, new_first, new_second, new_scalars)):
        for target, value in zip(targets, results):
            target.assign(value)


def _through_tensorflow(step, learning_rate, groups):
    """``step`` as TensorFlow ops: ``jax2tf`` lowers the JAX function to StableHLO, which
    TensorFlow runs inside its graph (and XLA compiles with the model)."""
    import jax
    import tensorflow as tf
    from jax.experimental import jax2tf

    from upgd_ref.adapters.jax import x64_scope

    counts = [len(g) for g in groups]

    def flat_step(lr, *flat):
        parts, start = [], 0
        for c in counts:
            parts.append(list(flat[start:start + c]))
            start += c
        return jax.tree_util.tree_leaves(step(lr, *parts))

    with x64_scope():
        flat = [tf.convert_to_tensor(x) for g in groups for x in g]
        results = jax2tf.convert(flat_step, with_gradient=False)(tf.convert_to_tensor(learning_rate), *flat)
    structure = [counts[0], counts[2], counts[3], counts[4], counts[5]]
    out, start = [], 0
    for c in structure:
        out.append(list(results[start:start + c]))
        start += c
    return (*out, results[start])
