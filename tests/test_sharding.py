"""Sharded QAT: one train step on 8 simulated devices equals the single-device step.

Modes: automatic (``jax.jit`` + ``NamedSharding``), explicit mesh axes, and ``shard_map`` with
``check_vma=True``; meshes: data, FSDP, tensor and mixed. conftest.py starts JAX with
``--xla_force_host_platform_device_count=8``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from qjax._src import sharding as S
from qjax.models.llama import PARTITION_RULES, Llama, LlamaConfig, quantization_rules
from qjax.nn import Method, dense_layout, quantize_model, resolve
from qjax.nn import ops as C

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

CFG = LlamaConfig(d_model=64, n_layers=1, n_heads=2, hidden=128, max_seq_len=16)
MESHES = {"data": {"data": 2}, "fsdp": {"fsdp": 2}, "tensor": {"tensor": 2},
          "mixed": {"data": 2, "fsdp": 2, "tensor": 2}}
TX = optax.adamw(1e-3)
is_spec = lambda x: isinstance(x, P)


def _method(name, axis_name=None):
    return Method(name, weight_bits=4, act_bits=4, hadamard_block=32,
                  activation_axis_name=axis_name)


def _loss(model, p, ids):
    logits = model.apply({"params": p}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def _step(model, p, o, ids):
    loss, g = jax.value_and_grad(functools.partial(_loss, model))(p, ids)
    u, o = TX.update(g, o, p)
    return optax.apply_updates(p, u), o, loss, g


@functools.cache
def _reference(method):
    model = quantize_model(Llama(CFG), quantization_rules(_method(method)))
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)
    params = model.init(jax.random.key(0), ids[:1])["params"]
    out = jax.jit(functools.partial(_step, model))(params, TX.init(params), ids)
    return model, params, ids, jax.tree.map(np.asarray, out)


def _mesh(shape, axis_types="explicit"):
    n = math.prod(shape.values())
    return S.make_mesh(shape, axis_types=axis_types, devices=jax.devices()[:n])


def _check(ref, out, specs=None, mesh=None):
    p_ref, _, loss_ref, g_ref = ref
    p, _, loss, g = out
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(np.asarray(b), a, atol=2e-4 * np.abs(a).max() + 1e-12)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p), strict=True):
        np.testing.assert_allclose(np.asarray(b), a, atol=5e-5)  # 5% of one Adam step
    if specs is not None:  # the params really are sharded as the rules say
        for leaf, spec in zip(jax.tree.leaves(p), jax.tree.leaves(specs, is_leaf=is_spec),
                              strict=True):
            assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), (
                leaf.sharding, spec)


def _place(mesh, params, ids):
    specs = S.param_specs(params, mesh, PARTITION_RULES)
    ospecs = S.opt_state_specs(TX, params, specs)
    p = S.put(params, S.named_shardings(specs, mesh))
    o = S.put(TX.init(params), S.named_shardings(ospecs, mesh))
    x = S.put(ids, NamedSharding(mesh, S.batch_spec(mesh)))
    return specs, ospecs, p, o, x


JIT_CASES = [(mode, method, mesh) for mode in ("auto", "explicit") for method in ("quest", "lsq")
             for mesh in MESHES]
FAST_JIT = {("auto", "quest", m) for m in MESHES} | {("explicit", "quest", m) for m in MESHES} | {
    ("auto", "lsq", "mixed"), ("explicit", "lsq", "mixed")}


@pytest.mark.parametrize("mode,method,mesh_name", [
    c if c in FAST_JIT else pytest.param(*c, marks=pytest.mark.slow) for c in JIT_CASES])
def test_jit_step_matches_single_device(mode, method, mesh_name):
    model, params, ids, ref = _reference(method)
    mesh = _mesh(MESHES[mesh_name], mode)
    specs, ospecs, p, o, x = _place(mesh, params, ids)
    out_sh = S.named_shardings((specs, ospecs), mesh)
    step = jax.jit(functools.partial(_step, model), out_shardings=(*out_sh, None, None))
    with jax.set_mesh(mesh):
        out = step(p, o, x)
    _check(ref, out, specs, mesh)


def _gather(p, spec):
    for axis, names in enumerate(tuple(spec)):
        if names is not None:
            p = jax.lax.all_gather(p, names, axis=axis, tiled=True)
    return p


SHARD_MAP_MESHES = {"data": {"data": 8}, "data_fsdp": {"data": 2, "fsdp": 4},
                    "mixed": MESHES["mixed"]}


@pytest.mark.parametrize("method,mesh_name", [
    ("quest", "data"), ("quest", "data_fsdp"), ("lsq", "data"), ("quest", "mixed"),
    pytest.param("lsq", "data_fsdp", marks=pytest.mark.slow),
    pytest.param("lsq", "mixed", marks=pytest.mark.slow)])
def test_shard_map_step_matches_single_device(method, mesh_name):
    """FSDP written out by hand: all-gather inside, gradients reduce-scattered by autodiff.

    On the mixed mesh the ``tensor`` axis splits the params too (gathered like FSDP) while the
    batch is split over data x fsdp; tensor parallelism inside ``shard_map`` needs a model written
    for local shapes and is tested on a row-parallel layer below.
    """
    _, params, ids, ref = _reference(method)
    shape = SHARD_MAP_MESHES[mesh_name]
    mesh = _mesh(shape)
    batch = tuple(a for a in S.BATCH_AXES if a in shape)
    # LSQ's activation step is per tensor, and the batch is split: its statistics span shards.
    model = quantize_model(Llama(CFG), quantization_rules(
        _method(method, batch if method == "lsq" else None)))
    specs, ospecs, p, o, x = _place(mesh, params, ids)

    def local_step(p, o, ids):
        def loss(p, ids):
            full = jax.tree.map(_gather, p, specs)
            return _loss(model, full, ids)

        value, g = jax.value_and_grad(loss)(p, ids)
        # Autodiff summed the local means of all 8 devices (tensor replicas compute equal ones).
        g = jax.tree.map(lambda t: t / 8, g)
        u, o = TX.update(g, o, p)
        return optax.apply_updates(p, u), o, jax.lax.pmean(value, tuple(shape)), g

    step = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(specs, ospecs, P(batch)),
                                 out_specs=(specs, ospecs, P(), specs), check_vma=True))
    _check(ref, step(p, o, x), specs, mesh)


@functools.cache
def _row_parallel_case():
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k1, (6, 256)) * jnp.linspace(0.1, 3.0, 256)  # uneven row statistics
    w = jax.random.normal(k2, (256, 16)) * 0.05
    c = jax.random.normal(k3, (6, 16))
    return x, w, c


def _row_parallel(axis_name):
    method = Method("quest", 4, 4, hadamard_block=64, weight_axis_name=axis_name,
                    activation_axis_name=axis_name)
    lq = resolve(method, dense_layout((256, 16)))

    def f(x, w, c):
        y = C.dense_op(x, w, None, lq, None, None, qat=True)
        if axis_name is not None:
            y = jax.lax.psum(y, axis_name)
        return jnp.sum(y * c), y

    return f


def test_row_parallel_quest_layer_uses_global_statistics():
    """Contraction axis split over ``tensor``: RMS scales combine shards, blocks stay local."""
    x, w, c = _row_parallel_case()
    want_grads, want = jax.jit(jax.grad(_row_parallel(None), argnums=(0, 1), has_aux=True))(
        x, w, c)
    mesh = _mesh({"tensor": 4})
    xs = S.put(x, NamedSharding(mesh, P(None, "tensor")))
    ws = S.put(w, NamedSharding(mesh, P("tensor", None)))
    cs = S.put(c, NamedSharding(mesh, P()))

    def run(axis_name):
        f = jax.grad(_row_parallel(axis_name), argnums=(0, 1), has_aux=True)
        return jax.jit(jax.shard_map(
            f, mesh=mesh, in_specs=(P(None, "tensor"), P("tensor", None), P()),
            out_specs=((P(None, "tensor"), P("tensor", None)), P()), check_vma=True))(xs, ws, cs)

    grads, y = run("tensor")
    # Summation order differs (psum of shard sums vs one sum), so allow float rounding.
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # Local statistics would give another quantization: the collective is what makes it equal.
    lq_local = resolve(Method("quest", 4, 4, hadamard_block=64), dense_layout((64, 16)))
    local = jax.jit(jax.shard_map(
        lambda x, w: jax.lax.psum(C.dense_op(x, w, None, lq_local, None, None, qat=True),
                                  "tensor"),
        mesh=mesh, in_specs=(P(None, "tensor"), P("tensor", None)), out_specs=P(),
        check_vma=True))(xs, ws)
    assert np.abs(np.asarray(local) - np.asarray(want)).max() > 1e-3


def test_stochastic_rounding_sharded_equals_unsharded_under_jit():
    spec = qjax.QuantSpec("int4", qjax.PerRow(-1), rounding="stochastic")
    x = jax.random.normal(jax.random.key(0), (8, 64))
    key = jax.random.key(7)
    f = jax.jit(lambda x, k: qjax.fake_quant(x, spec, key=k))
    want = f(x, key)
    mesh = _mesh({"data": 4, "tensor": 2}, "auto")
    got = f(S.put(x, NamedSharding(mesh, P("data", "tensor"))), key)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_shard_key_gives_each_shard_its_own_noise():
    spec = qjax.QuantSpec("int4", qjax.PerTensor(), rounding="stochastic")
    mesh = _mesh({"data": 4})
    x = S.put(jnp.tile(jnp.linspace(-1.0, 1.0, 32)[None], (4, 1)),
              NamedSharding(mesh, P("data")))  # the same row on every shard
    key = jax.random.fold_in(jax.random.key(0), 3)  # step 3

    def quantize(folded):
        def f(x):
            k = S.shard_key(key, "data") if folded else key
            return qjax.fake_quant(x, spec, key=k, scale=jnp.float32(0.25))
        return np.asarray(jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"),
                                                out_specs=P("data")))(x))

    same, folded = quantize(False), quantize(True)
    assert all((same[i] == same[0]).all() for i in range(4))
    assert len({folded[i].tobytes() for i in range(4)}) == 4


def test_hadamard_block_straddling_shards_is_an_error_on_explicit_meshes():
    mesh = _mesh({"tensor": 4})
    x = S.put(jnp.ones((2, 64)), NamedSharding(mesh, P(None, "tensor")))
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match="straddles shards"):
            jax.jit(lambda x: qjax.hadamard_transform(x, 32))(x)
        y = jax.jit(lambda x: qjax.hadamard_transform(x, 16))(x)  # 16 per device: fine
    np.testing.assert_allclose(np.asarray(y), qjax.hadamard_transform(jnp.ones((2, 64)), 16),
                               rtol=1e-6)


@pytest.mark.parametrize("block", [64, 512])  # Kronecker c = 2 (signed sums), c = 16 (recursion)
def test_kronecker_hadamard_on_explicit_meshes(block):
    """Activations (batch sharded) and weights (rotated axis over fsdp, the other over tensor):
    the Kronecker transform's reshapes must type-check on an explicit mesh, values and
    gradients as unsharded."""
    mesh = _mesh({"fsdp": 2, "tensor": 2})
    x = jax.random.normal(jax.random.key(0), (4, 3, 2 * block))
    w = jax.random.normal(jax.random.key(1), (2 * block, 8))
    def f(x, w):
        rotate = functools.partial(qjax.hadamard_transform, block_size=block, method="kronecker")
        return (rotate(x) ** 2).sum() + jnp.sin(rotate(w, axis=0)).sum()

    ref = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
    xs = S.put(x, NamedSharding(mesh, P("fsdp")))
    ws = S.put(w, NamedSharding(mesh, P("fsdp", "tensor")))
    with jax.set_mesh(mesh):
        out = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(xs, ws)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-5)


def test_param_specs_follow_rules_and_scales_follow_their_axis():
    model = quantize_model(Llama(CFG), quantization_rules(_method("lsq")))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, 8), jnp.int32))["params"])
    specs = S.param_specs(params, _mesh(MESHES["mixed"]), PARTITION_RULES)
    attn, mlp = specs["blocks_0"]["attn"], specs["blocks_0"]["mlp"]
    assert attn["q"]["kernel"] == P("fsdp", "tensor")
    assert attn["q"]["kernel_scale"] == P(None, "tensor")  # (1, N): per output channel
    assert attn["o"]["kernel"] == P("tensor", "fsdp")
    assert attn["o"]["kernel_scale"] == P(None, "fsdp")
    assert attn["q"]["input_scale"] == P()
    assert mlp["down"]["kernel"] == P("tensor", "fsdp")
    assert specs["blocks_0"]["attn_norm"]["scale"] == P()
    # Axes the mesh lacks are dropped: the same rules serve a data-parallel mesh.
    dp = S.param_specs(params, _mesh({"data": 8}), PARTITION_RULES)
    assert all(s == P() for s in jax.tree.leaves(dp, is_leaf=is_spec))
    # Per-group scales (blocked view (K/g, 1, N)) are split like their groups.
    assert S._scale_spec((4, 1, 32), (256, 32), P("fsdp", "tensor")) == P("fsdp", None, "tensor")


def test_opt_state_specs_mirror_params():
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
    specs = {"w": P("fsdp"), "b": P()}
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.masked(optax.adamw(1e-3), {"w": True, "b": False}))
    ospecs = S.opt_state_specs(tx, params, specs)
    adam = ospecs[1].inner_state[0]
    assert adam.mu["w"] == P("fsdp") and adam.nu["w"] == P("fsdp")
    assert adam.count == P()


def test_bad_meshes_and_shapes_raise():
    with pytest.raises(ValueError, match="unknown mesh axis"):
        S.make_mesh({"model": 8})
    with pytest.raises(ValueError, match="needs 6 devices"):
        S.make_mesh({"data": 3, "tensor": 2})
    with pytest.raises(ValueError, match="positive int"):
        S.make_mesh({"data": 0})
    with pytest.raises(ValueError, match="axis_types"):
        S.make_mesh({"data": 8}, axis_types="manual")
    mesh = _mesh({"data": 2, "fsdp": 4})
    with pytest.raises(ValueError, match="batch_size 12 is not divisible"):
        S.check_batch(12, mesh)
    with pytest.raises(ValueError, match="not divisible by mesh axes"):
        S.param_specs({"w": jnp.zeros((6, 8))}, mesh, [(r"w", P("fsdp"))])
    with pytest.raises(ValueError, match="straddles shards"):
        S.check_hadamard_blocks({"w": jnp.zeros((64, 8))}, {"w": P("fsdp")}, mesh, 32, "w")
    with pytest.raises(ValueError, match="a rule must be"):
        S.param_specs({"w": jnp.zeros((8, 8))}, mesh, [("w", ("fsdp",))])


def test_param_specs_refuse_unknown_and_repeated_mesh_axes():
    # P("foo", None) was silently replicated and P("fsdp", "fsdp") accepted.
    mesh = _mesh({"data": 2, "fsdp": 4})
    w = {"w": jnp.zeros((8, 8))}
    with pytest.raises(ValueError, match=r"rule 'w'.*unknown mesh axis 'foo'.*'data', 'fsdp'"):
        S.param_specs(w, mesh, [(r"w", P("foo", None))])
    with pytest.raises(ValueError, match=r"rule 'w'.*unknown mesh axis 'tensr'"):
        S.param_specs(w, mesh, [(r"x", P()), (r"w", P(None, ("fsdp", "tensr")))])
    for bad in (P("fsdp", "fsdp"), P(("data", "fsdp"), "fsdp")):
        with pytest.raises(ValueError, match=r"rule 'w'.*mesh axis 'fsdp' more than once"):
            S.param_specs(w, mesh, [(r"w", bad)])
    # A known axis the mesh lacks is still dropped, so one rule set serves every mesh.
    assert S.param_specs(w, mesh, [(r"w", P("fsdp", "tensor"))]) == {"w": P("fsdp")}


def test_batch_and_block_arguments_are_checked():
    mesh = _mesh({"data": 2})
    for bad, error in ((0, ValueError), (-4, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="batch_size"):
            S.check_batch(bad, mesh)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="ndim"):
            S.batch_spec(mesh, bad)
    assert S.batch_spec(mesh, 1) == P("data")
    for bad in (0, 3):
        with pytest.raises(ValueError, match="block_size"):
            S.check_hadamard_blocks({"w": jnp.zeros((8, 8))}, {"w": P()}, mesh, bad, "w")


def test_axis_name_errors():
    spec = qjax.QuantSpec("int4", qjax.PerRow(-1), scale_rule=qjax.Percentile(99.0))
    mesh = _mesh({"tensor": 2})
    f = jax.shard_map(lambda x: qjax.fake_quant(x, spec, axis_name="tensor"), mesh=mesh,
                      in_specs=P(None, "tensor"), out_specs=P(None, "tensor"))
    with pytest.raises(ValueError, match="percentile"):
        jax.jit(f)(S.put(jnp.ones((2, 8)), NamedSharding(mesh, P(None, "tensor"))))
    with pytest.raises(ValueError, match="integer_forward"):
        Method("ste", 8, 8, integer_forward=True,
               activation_axis_name="tensor").layer_quant(dense_layout((8, 8)))


@pytest.mark.parametrize("integer_forward", [False, True])
def test_quantized_dense_forwards_out_sharding(integer_forward):
    """Explicit mesh, user-chosen output sharding, through the fake-quant and int8 forwards."""
    from flax import nnx

    mesh = _mesh({"data": 2, "tensor": 4})
    method = Method("ste", 8, 8, integer_forward=integer_forward)
    layer = qjax.nn.nnx.QDense(16, 8, method=method, use_bias=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 16))
    want = layer(x)
    xs = S.put(x, NamedSharding(mesh, P("data", None)))
    kernel = S.put(layer.kernel[...], NamedSharding(mesh, P(None, None)))
    layer.kernel[...] = kernel
    with jax.set_mesh(mesh):
        y = nnx.jit(lambda m, x: m(x, out_sharding=P(None, "tensor")))(layer, xs)
        g = jax.jit(jax.grad(lambda k, x: jnp.sum(C.dense_op(
            x, k, None, resolve(method, dense_layout((16, 8))), None, None, qat=True,
            out_sharding=P(None, "tensor")) ** 2)))(kernel, xs)
    assert y.sharding.spec == P(None, "tensor")
    assert g.sharding.spec == kernel.sharding.spec  # the cotangent has its primal's sharding
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_mean_abs_statsq_with_axis_name_is_the_global_rule():
    """StatsQ (MeanAbs) with the reduced axis split over 'tensor' inside shard_map: psum of the
    per-shard means gives the one-device values."""
    from qjax.methods import ofq

    spec = ofq.statsq_spec(2, qjax.PerRow(-1))
    mesh = _mesh({"tensor": 2})
    x = jax.random.normal(jax.random.key(0), (4, 16))
    f = jax.shard_map(lambda v: qjax.fake_quant(v, spec, axis_name="tensor"), mesh=mesh,
                      in_specs=P(None, "tensor"), out_specs=P(None, "tensor"))
    y = jax.jit(f)(S.put(x, NamedSharding(mesh, P(None, "tensor"))))
    np.testing.assert_allclose(np.asarray(y), np.asarray(qjax.fake_quant(x, spec)), rtol=1e-6)
