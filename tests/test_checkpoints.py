import jax.numpy as jnp
import numpy as np
import pytest

from hemijax.training import checkpoints


def _state():
  return {"step": jnp.int32(3), "params": {"w": jnp.arange(4.0)}, "model_state": {},
          "opt_state": (jnp.ones(4),)}


def test_named_items_restore_params_alone_and_the_whole_state(tmp_path):
  manager = checkpoints.make_manager(tmp_path)
  checkpoints.save(manager, 3, _state(), metrics={checkpoints.BEST_METRIC: 0.5})
  assert sorted(p.name for p in (tmp_path / "checkpoints" / "3").iterdir()
                if p.is_dir()) == ["optimizer", "params"]  # the empty model_state is not written
  variables = checkpoints.restore_variables(manager, 3, {"params": {"w": jnp.zeros(4)}})
  np.testing.assert_array_equal(variables["params"]["w"], np.arange(4.0))
  state = checkpoints.restore(manager, 3, _state())
  assert int(state["step"]) == 3 and state["model_state"] == {}
  np.testing.assert_array_equal(state["opt_state"][0], np.ones(4))
  manager.close()


def test_a_checkpoint_in_the_old_single_item_form_is_refused_in_one_line(tmp_path):
  manager = checkpoints.make_manager(tmp_path)
  (tmp_path / "checkpoints" / "7" / "state").mkdir(parents=True)
  with pytest.raises(checkpoints.CheckpointError, match="older hemijax"):
    checkpoints.restore_variables(manager, 7, {"params": {"w": jnp.zeros(4)}})
  manager.close()
