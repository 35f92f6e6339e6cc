"""Every convolution impl against `lax.conv_general_dilated`, and max_pool against flax's.

Float32 at "highest" matmul precision, so that differences are rounding only: outputs and
gradients (input and kernel) must agree to a relative error (max |a - b| / max |b|) under 1e-5.
"""
import itertools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

from hemijax.nn import layers, onednn
from hemijax.models.hemis import HeMIS

IMPLS = ("planes", "slots", "onednn", "matmul")
TOL = 1e-5


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def reference(x, kernel, strides, dilation, padding):
  nd = kernel.ndim - 2
  spec = "N" + "DHW"[-nd:] + "C"
  return lax.conv_general_dilated(
      x, kernel, layers._tuple(strides, nd), padding, rhs_dilation=layers._tuple(dilation, nd),
      dimension_numbers=(spec, "DHW"[-nd:] + "IO", spec))


def value_and_grads(fn, x, kernel, cotangent):
  y, vjp = jax.vjp(fn, x, kernel)
  return (y,) + vjp(cotangent)


def check_against_lax(impls, x, kernel, strides, dilation, padding, seed=0):
  ref_fn = lambda x, k: reference(x, k, strides, dilation, padding)
  y_ref = ref_fn(x, kernel)
  cotangent = jax.random.normal(jax.random.key(seed), y_ref.shape)
  expected = value_and_grads(ref_fn, x, kernel, cotangent)
  for impl in impls:
    fn = lambda x, k: layers.conv(x, k, strides=strides, dilation=dilation, padding=padding,
                                  impl=impl)
    got = jax.jit(lambda x, k, c: value_and_grads(fn, x, k, c))(x, kernel, cotangent)
    for name, g, e in zip(("output", "d/dx", "d/dkernel"), got, expected):
      assert rel_err(g, e) < TOL, (impl, name, x.shape, kernel.shape, strides, dilation, padding)


def random_case(rng, nd, size, window, cin, cout, batch=1):
  x = rng.normal(size=(batch,) + tuple(size) + (cin,)).astype(np.float32)
  kernel = rng.normal(size=tuple(window) + (cin, cout)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(kernel)


# The grid the issue asks for, one spatial rank per case so that every rank sees every setting.
GRID = list(itertools.product((1, 3, 5), (1, 2), (1, 2, 4), ("SAME", "VALID")))


@pytest.mark.parametrize("window,stride,dilation,padding", GRID)
def test_grid_matches_lax(window, stride, dilation, padding):
  index = GRID.index((window, stride, dilation, padding))
  nd = (1, 2, 3)[index % 3]
  rng = np.random.default_rng(index)
  extent = (window - 1) * dilation + 1
  size = rng.integers(extent, extent + 6, size=nd)
  x, kernel = random_case(rng, nd, size, (window,) * nd, int(rng.integers(1, 5)),
                          int(rng.integers(1, 5)), batch=int(rng.integers(1, 3)))
  check_against_lax(IMPLS, x, kernel, stride, dilation, padding, seed=index)


@settings(max_examples=6, deadline=None)  # each example compiles 2 lowerings x 3 programs
@given(data=st.data())
def test_random_3d_matches_lax(data):
  """Mixed per-axis windows, strides and dilations, including explicit (also negative) padding."""
  draw = data.draw
  window = tuple(draw(st.sampled_from((1, 3, 5))) for _ in range(3))
  strides = tuple(draw(st.sampled_from((1, 2))) for _ in range(3))
  dilation = tuple(draw(st.sampled_from((1, 2, 4))) for _ in range(3))
  extent = [(k - 1) * r + 1 for k, r in zip(window, dilation)]
  size = [draw(st.integers(e, e + 5)) for e in extent]
  padding = draw(st.one_of(
      st.sampled_from(("SAME", "VALID")),
      st.tuples(*[st.tuples(st.integers(-1, 3), st.integers(-1, 3)) for _ in range(3)])))
  if not isinstance(padding, str):
    # Keep at least one output position along every axis.
    padding = tuple((lo, max(hi, e - n - lo)) for (lo, hi), e, n in zip(padding, extent, size))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  x, kernel = random_case(rng, 3, size, window, draw(st.integers(1, 6)), draw(st.integers(1, 6)),
                          batch=draw(st.integers(1, 2)))
  # Both 3D kernel gradients: XLA's 2D one over depth-shifted planes (what small layers get) and
  # the blocked loop (large layers).
  from hemijax.nn import conv as conv_lib

  max_work = draw(st.sampled_from((0, 1 << 62)))
  with mock.patch.object(conv_lib, "_PLANES_KERNEL_GRAD_MAX_WORK", max_work):
    # "slots" in 3D is XLA's own convolution and gradients (the reference): the grid covers it.
    check_against_lax(("planes", "onednn", "matmul"), x, kernel, strides, dilation, padding)


@pytest.mark.parametrize("spatial,cin,cout,planes", [
    ((8, 8, 8), 4, 4, True), ((32, 32, 32), 48, 48, False), ((8, 8), 4, 4, False)])
def test_kernel_gradient_rule_per_layer(spatial, cin, cout, planes):
  """Small 3D layers take XLA's 2D kernel gradient over planes; large ones and 2D layers (with
  impl="planes") the blocked loop."""
  from hemijax.nn import conv as conv_lib

  x = jnp.zeros((2,) + spatial + (cin,))
  kernel = jnp.zeros((3,) * len(spatial) + (cin, cout))
  grad = jax.grad(lambda k: layers.conv(x, k, impl="planes").sum())
  spy = lambda name: mock.patch.object(conv_lib, name, wraps=getattr(conv_lib, name))
  with spy("_planes_kernel_grad") as a, spy("_kernel_grad_loop") as b:
    jax.make_jaxpr(grad)(kernel)
  assert (a.call_count, b.call_count) == ((1, 0) if planes else (0, 1))


def test_onednn_runs_onednn_where_this_jaxlib_does_and_planes_elsewhere():
  """On this (CPU) jaxlib the call passes its check and is used, forward and input gradient;
  where the check fails (another jaxlib), or for bfloat16, the same layer lowers as "planes"."""

  x, kernel = jnp.ones((1, 6, 6, 6, 4)), jnp.ones((3, 3, 3, 4, 4))
  program = lambda x, k: jax.grad(lambda x, k: layers.conv(x, k, impl="onednn").sum(),
                                  (0, 1))(x, k)
  assert onednn.available()
  assert str(jax.make_jaxpr(program)(x, kernel)).count("onednn_convolution") == 2
  assert "onednn_convolution" not in str(jax.make_jaxpr(program)(x.astype(jnp.bfloat16),
                                                                kernel.astype(jnp.bfloat16)))
  with mock.patch.object(onednn, "available", return_value=False):  # (new shapes: not cached)
    assert "onednn_convolution" not in str(jax.make_jaxpr(program)(x[:, 1:], kernel))


def test_hemis_shapes_match_lax():
  """The shapes the HeMIS back ends use: one input channel, and many channels on both sides."""
  rng = np.random.default_rng(1)
  for cin, cout in ((1, 8), (16, 16), (24, 4)):
    x, kernel = random_case(rng, 3, (6, 7, 8), (3, 3, 3), cin, cout, batch=2)
    check_against_lax(IMPLS, x, kernel, 1, 1, "SAME")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("in_axes", [(0, 0), (0, None), (None, 0)])
def test_vmap_over_stacked_kernels(impl, in_axes):
  """Per-modality weights: vmapped impls equal lax's vmap, values and gradients."""
  rng = np.random.default_rng(2)
  xs = jnp.asarray(rng.normal(size=(3, 2, 5, 6, 7, 2)), jnp.float32)
  ks = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 2, 4)), jnp.float32)
  xs = xs if in_axes[0] == 0 else xs[0]
  ks = ks if in_axes[1] == 0 else ks[0]

  def loss(conv_impl):
    def f(x, k):
      y = jax.vmap(lambda a, b: conv_impl(a, b), in_axes)(x, k)
      return jnp.sum(jnp.sin(y)), y
    return f

  ref = jax.value_and_grad(loss(lambda a, b: reference(a, b, 1, 1, "SAME")), (0, 1),
                           has_aux=True)(xs, ks)
  got = jax.jit(jax.value_and_grad(loss(lambda a, b: layers.conv(a, b, impl=impl)), (0, 1),
                                   has_aux=True))(xs, ks)
  assert rel_err(got[0][1], ref[0][1]) < TOL
  for g, e in zip(got[1], ref[1]):
    assert rel_err(g, e) < TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_large_slots_run_one_after_another(impl, monkeypatch):
  """Above `_SEQUENTIAL_SLOT_BYTES` a vmapped kernel runs slot by slot (lax.map): same values and
  gradients, and a loop over the slots instead of one convolution per slot."""
  from hemijax.nn import conv as conv_lib
  rng = np.random.default_rng(5)
  xs = jnp.asarray(rng.normal(size=(3, 1, 5, 6, 4, 2)), jnp.float32)
  ks = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 2, 4)), jnp.float32)

  def loss(conv_impl):
    return lambda x, k: jnp.sum(jnp.sin(jax.vmap(conv_impl)(x, k)))

  ref = jax.value_and_grad(loss(lambda a, b: reference(a, b, 1, 1, "SAME")), (0, 1))(xs, ks)
  program = lambda: jax.jit(loss(lambda a, b: layers.conv(a, b, impl=impl))).lower(
      xs, ks).as_text()
  unrolled = program()
  monkeypatch.setattr(conv_lib, "_SEQUENTIAL_SLOT_BYTES", 0)
  sequential = program()
  # One convolution per slot, or one inside a loop over the slots (matmul: loops only).
  assert sequential.count("stablehlo.convolution") < max(unrolled.count("stablehlo.convolution"), 1)
  assert sequential != unrolled
  ours = loss(lambda a, b: layers.conv(a, b, impl=impl))
  got = jax.jit(jax.value_and_grad(ours, (0, 1)))(xs, ks)
  assert rel_err(got[0], ref[0]) < TOL
  for g, e in zip(got[1], ref[1]):
    assert rel_err(g, e) < TOL


def test_nested_vmap_and_2d():
  rng = np.random.default_rng(3)
  xs = jnp.asarray(rng.normal(size=(2, 3, 1, 9, 8, 2)), jnp.float32)
  ks = jnp.asarray(rng.normal(size=(2, 3, 3, 3, 2, 5)), jnp.float32)
  ref = jax.vmap(jax.vmap(lambda a, b: reference(a, b, 2, 1, "SAME")))(xs, ks)
  for impl in IMPLS:
    got = jax.jit(jax.vmap(jax.vmap(lambda a, b: layers.conv(a, b, strides=2, impl=impl))))(xs, ks)
    assert rel_err(got, ref) < TOL


def test_auto_and_unknown_impl(monkeypatch):
  cpu = jax.default_backend() == "cpu"
  if cpu and onednn.available():
    assert layers.resolve_impl("auto") == "onednn"
    assert {layers.resolve_impl("auto", nd) for nd in (1, 2, 3)} == {"onednn"}
  # Where this jaxlib does not run oneDNN's call: planes (3D) and slots (1D, 2D) on CPU.
  monkeypatch.setattr(onednn, "available", lambda: False)
  assert layers.resolve_impl("auto", 3) == ("planes" if cpu else "xla")
  assert layers.resolve_impl("auto", 2) == ("slots" if cpu else "xla")
  assert layers.resolve_impl("auto", 1) == ("slots" if cpu else "xla")
  assert set(IMPLS + ("xla", "auto")) == set(layers.IMPLS)
  with pytest.raises(ValueError, match="unknown convolution impl"):
    layers.resolve_impl("cudnn")
  with pytest.raises(ValueError, match="does not match kernel"):
    layers.conv(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 1)))


def test_bfloat16_keeps_dtype():
  x = jnp.ones((1, 5, 5, 5, 2), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 3, 2, 3), jnp.bfloat16)
  for impl in IMPLS:
    y, grads = jax.value_and_grad(lambda x, k: jnp.sum(layers.conv(x, k, impl=impl)), (0, 1))(
        x, kernel)
    assert y.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    # All-ones input: a centre voxel sums 27 taps x 2 channels.
    assert float(layers.conv(x, kernel, impl=impl)[0, 2, 2, 2, 0]) == 54


def test_conv_module_params_and_impls_agree():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 6, 3))
  modules = {impl: layers.Conv(4, 3, strides=(1, 2, 1), dilation=(2, 1, 1), impl=impl)
             for impl in layers.IMPLS}
  variables = modules["xla"].init(jax.random.key(1), x)
  assert set(variables["params"]) == {"kernel", "bias"}
  assert variables["params"]["kernel"].shape == (3, 3, 3, 3, 4)
  ref = modules["xla"].apply(variables, x)
  for impl, module in modules.items():
    assert rel_err(module.apply(variables, x), ref) < TOL, impl


def test_hemis_conv_impl_reaches_every_conv():
  """config.model.conv_impl switches every convolution: same outputs and gradients, and "xla"
  leaves convolutions in the program while "matmul" leaves none."""
  image = jax.random.normal(jax.random.key(0), (1, 6, 6, 6, 2))
  mask = jnp.array([[True, True]])
  labels = jnp.zeros((1, 6, 6, 6), jnp.int32)
  models = {impl: HeMIS(num_modalities=2, num_classes=3, backend_features=(4, 5),
                        backend_kernel=3, frontend_features=(6,), frontend_kernel=3,
                        final_kernel=3, conv_impl=impl) for impl in ("xla", "planes", "matmul")}
  params = models["xla"].init(jax.random.key(1), image, mask)["params"]

  def loss(model):
    def f(params):
      logits = model.apply({"params": params}, image, mask)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))
    return f

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss(models["xla"])))(params)
  for impl in ("planes", "matmul"):
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss(models[impl])))(params)
    assert rel_err(got_loss, ref_loss) < TOL
    for g, e in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
      assert rel_err(g, e) < 1e-4  # summed through several layers
  text = {impl: str(jax.make_jaxpr(loss(m))(params)) for impl, m in models.items()}
  assert "conv_general_dilated" in text["xla"]
  assert "conv_general_dilated" not in text["matmul"]


def test_conv_factory_binds_the_lowering_and_names_the_option_on_bad_input():
  conv = layers.conv_factory("matmul", use_bias=False)
  module = conv(4, 3)
  assert (module.impl, module.use_bias, module.features) == ("matmul", False, 4)
  with pytest.raises(ValueError, match="config.model.conv_impl: unknown convolution impl 'cuda'"):
    layers.conv_factory("cuda")


POOL_CASES = [
    ((2, 7, 8, 9, 3), 2, 1, "SAME"),       # HeMIS: keeps the resolution
    ((2, 7, 8, 9, 3), 2, None, "SAME"),    # U-Net: halves it
    ((1, 7, 8, 9, 2), 3, 2, "SAME"),
    ((1, 7, 8, 9, 2), 2, None, "VALID"),
    ((2, 9, 3), 3, 2, "VALID"),
    ((2, 9, 10, 2), (2, 3), (1, 2), "SAME"),
    ((2, 9, 10, 2), (2, 3), (1, 2), ((1, 0), (2, 1))),
]


@pytest.mark.parametrize("shape,window,strides,padding", POOL_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_matches_flax(shape, window, strides, padding, ties):
  """Values and gradients equal flax.linen.max_pool's, ties included (the first maximum in the
  window gets the gradient, as with reduce_window)."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=shape).astype(np.float32)
  x = jnp.asarray(np.maximum(np.round(x), 0) if ties else x)  # ReLU'd, rounded: many ties
  nd = x.ndim - 2
  window_ = layers._tuple(window, nd)
  strides_ = window_ if strides is None else layers._tuple(strides, nd)
  ref_fn = lambda x: nn.max_pool(x, window_, strides_, padding=padding)
  fn = lambda x: layers.max_pool(x, window, strides, padding)
  y_ref, vjp_ref = jax.vjp(ref_fn, x)
  cotangent = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
  y, dx = jax.jit(lambda x, c: (fn(x), jax.vjp(fn, x)[1](c)[0]))(x, cotangent)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(dx, vjp_ref(cotangent)[0], rtol=1e-6, atol=1e-6)


def test_max_pool_vmaps():
  x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 6, 4))
  ref = jax.vmap(lambda v: nn.max_pool(v, (2, 2, 2), (1, 1, 1), "SAME"))(x)
  np.testing.assert_array_equal(jax.vmap(lambda v: layers.max_pool(v, 2, 1))(x), ref)
  g = jax.grad(lambda v: jnp.sum(jax.vmap(lambda u: layers.max_pool(u, 2, 1))(v) ** 2))(x)
  g_ref = jax.grad(lambda v: jnp.sum(jax.vmap(
      lambda u: nn.max_pool(u, (2, 2, 2), (1, 1, 1), "SAME"))(v) ** 2))(x)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-6)


def test_upsample():
  x = jnp.arange(8.0).reshape(1, 2, 2, 2, 1)
  y = layers.upsample(x, 2)
  assert y.shape == (1, 4, 4, 4, 1)
  np.testing.assert_array_equal(y[0, ::2, ::2, ::2], x[0])
  np.testing.assert_array_equal(y[0, 1::2, 1::2, 1::2], x[0])


def test_vmapped_kernels_compile_to_the_unrolled_program():
  """Per-modality weights through vmap must not be slower than a loop over modalities: on the
  "planes" path both compile to the same ungrouped convolutions (no feature_group_count), so
  they cost the same; lax's own vmap rule instead makes one grouped convolution."""
  xs = jnp.zeros((4, 2, 6, 6, 6, 1), jnp.float32)
  ks = jnp.zeros((4, 3, 3, 3, 1, 8), jnp.float32)

  def value_and_grads(apply):
    return jax.jit(jax.grad(lambda x, k: jnp.sum(apply(x, k) ** 2), (0, 1)))

  vmapped = lambda impl: value_and_grads(
      lambda x, k: jax.vmap(lambda a, b: layers.conv(a, b, impl=impl))(x, k))
  unrolled = value_and_grads(lambda x, k: jnp.stack(
      [layers.conv(x[m], k[m], impl="planes") for m in range(4)]))

  def convolutions(fn):
    hlo = fn.lower(xs, ks).compile().as_text()
    ops = [line for line in hlo.splitlines() if " convolution(" in line]
    grouped = [line for line in ops if "feature_group_count" in line]
    return len(ops), len(grouped)

  assert convolutions(vmapped("planes")) == convolutions(unrolled)
  assert convolutions(vmapped("planes"))[1] == 0
  assert convolutions(vmapped("xla"))[1] > 0   # what the vmap rule avoids
