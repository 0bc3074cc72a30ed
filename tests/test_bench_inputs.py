"""The benchmark's shared inputs and gradient comparison (jaxhack.bench): jaxhack and PyTorch must get
bit-identical weights from the hash (also where offset + index wraps int32), and the agreement numbers
must be the relative error / cosine they claim to be."""
import numpy as np
import pytest

from jaxhack.bench import gradient_agreement, hash_uniform_jax, hash_uniform_torch, leaf_offset, relative_error

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", ["['embed']", "['layers']['gate_proj']", "q_proj.u"])
def test_hash_inputs_identical_in_jax_and_torch(name):
    import jax.numpy as jnp

    offset = leaf_offset(name) + (1 << 31) - 5000  # force the int32 wrap inside the first 10k elements
    shape = (10, 1000)
    for jdt, tdt in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
        a = np.asarray(hash_uniform_jax(shape, offset, 0.02, jdt).astype(jnp.float32))
        b = hash_uniform_torch(shape, offset, 0.02, tdt, "cpu").float().numpy()
        np.testing.assert_array_equal(a, b)
    assert abs(float(a.std()) - 0.02) < 0.002 and abs(float(a.mean())) < 0.002


def test_gradient_agreement_measures_what_it_says():
    rng = np.random.default_rng(0)
    ours = {"q_proj": rng.normal(size=(3, 4, 8)), "v_proj": rng.normal(size=(3, 4, 8))}
    same = gradient_agreement(ours, {k: v.copy() for k, v in ours.items()})
    assert max(same["rel_err_per_module"].values()) == 0 and min(same["cos_worst_sample_per_module"].values()) == 1
    theirs = {k: v.copy() for k, v in ours.items()}
    theirs["v_proj"][1, 2] *= -1  # one sample, one layer of one module flipped
    agr = gradient_agreement(ours, theirs)
    a, b = ours["v_proj"][1].ravel(), theirs["v_proj"][1].ravel()
    assert agr["worst_module"] == "v_proj" and agr["rel_err_per_module"]["q_proj"] == 0
    assert agr["rel_err_per_module"]["v_proj"] == pytest.approx(np.linalg.norm(b - a) / np.linalg.norm(a), abs=1e-5)
    assert agr["cos_worst_sample_per_module"]["v_proj"] == pytest.approx(a @ b / (a @ a), abs=1e-5)
    per_layer = agr["rel_err_per_layer_worst_module"]
    assert per_layer[2] == pytest.approx(2.0, abs=1e-4) and per_layer[0] == 0
    assert relative_error(ours, theirs) == pytest.approx(agr["rel_err_per_module"]["v_proj"], abs=1e-5)
