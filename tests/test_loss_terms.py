"""Matryoshka, learnable temperature and distillation against independent references:
sentence-transformers' MatryoshkaLoss + MultipleNegativesRankingLoss and torch's F.kl_div on the
same embeddings, NumPy float64 loops, and central finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gte_jax import losses
from gte_jax.models.pooling import truncate_embeddings
from gte_jax.objectives import distill, matryoshka, temperature

torch = pytest.importorskip("torch")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _case(n=6, k=2, dim=48, seed=0):
    rng = np.random.default_rng(seed)
    q = _unit(rng.normal(size=(n, dim)))
    d = _unit(q + 0.8 * rng.normal(size=(n, dim)))
    neg = _unit(rng.normal(size=(n, k, dim)))
    return q, d, neg


def _np_infonce(q, d, neg, tau):
    """float64 loops: -(1/n) Σ_i log(e^{s(q_i,d_i)/τ} / Σ_c e^{s(q_i,c)/τ}), c = every positive
    and every hard negative of the batch (MNRL's candidates)."""
    cands = np.concatenate([d, neg.reshape(-1, d.shape[1])])
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ c) / tau for c in cands]
        top = max(logits)
        lse = top + np.log(sum(np.exp(x - top) for x in logits))
        total += lse - float(q[i] @ d[i]) / tau
    return total / len(q)


def _np_truncate(x, m):
    return _unit(x[..., :m])


DIMS, WEIGHTS = (48, 32, 16, 8), (1.0, 0.5, 0.25, 2.0)


def test_matryoshka_equals_the_numpy_float64_weighted_sum():
    q, d, neg = _case()
    want = sum(
        w * _np_infonce(_np_truncate(q, m), _np_truncate(d, m), _np_truncate(neg, m), 0.05)
        for m, w in zip(DIMS, WEIGHTS, strict=True)
    )
    with jax.enable_x64(True):
        got, metrics = matryoshka.matryoshka_loss(
            losses.infonce_loss, q, d, neg=neg, dims=DIMS, weights=WEIGHTS, temperature=0.05
        )
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), want, rtol=1e-12)
    assert set(metrics) >= {f"loss_dim{m}" for m in DIMS} | {"accuracy", "loss"}


class _Embeddings(torch.nn.Module):
    """A stand-in SentenceTransformer: feature dict {"rows": column index} -> precomputed rows."""

    def __init__(self, columns):
        super().__init__()
        self.columns = columns
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def _get_untruncated_embedding_dimension(self):
        return self.columns[0].shape[-1]

    def forward(self, features):
        return {"sentence_embedding": self.columns[int(features["rows"])] + 0 * self.dummy}


def test_matryoshka_matches_sentence_transformers_on_the_same_embeddings():
    from sentence_transformers.sentence_transformer import losses as st_losses

    q, d, neg = _case(seed=1)
    # Shuffled dims: both sort them largest first with their weights.
    dims, weights = (16, 48, 8, 32), (0.25, 1.0, 2.0, 0.5)
    columns = [torch.tensor(x) for x in (q, d, *(neg[:, j] for j in range(neg.shape[1])))]
    stub = _Embeddings(columns)
    inner = st_losses.MultipleNegativesRankingLoss(stub)  # scale 20 = τ 0.05
    st = st_losses.MatryoshkaLoss(stub, inner, list(dims), list(weights))
    features = [{"rows": torch.tensor(i)} for i in range(len(columns))]
    want = float(st(features, labels=None).detach())
    with jax.enable_x64(True):
        got, _ = matryoshka.matryoshka_loss(
            losses.infonce_loss, q, d, neg=neg, dims=dims, weights=weights, temperature=0.05
        )
    np.testing.assert_allclose(float(got), want, rtol=1e-10)


def test_matryoshka_gradient_flows_through_every_prefix():
    q, d, neg = _case(seed=2)

    def loss(dims):
        return lambda x: matryoshka.matryoshka_loss(
            losses.gte_loss, x, d, neg=neg, dims=dims, temperature=0.05
        )[0]

    with jax.enable_x64(True):
        g_full = jax.grad(loss((48,)))(q)
        g_small = jax.grad(loss((8,)))(q)
    assert np.all(np.asarray(g_small)[:, 8:] == 0)  # a prefix trains only its coordinates
    assert np.any(np.asarray(g_full)[:, 8:] != 0)


def test_matryoshka_refuses_bad_dims():
    q, d, neg = _case()
    with pytest.raises(ValueError, match="> the embedding dim"):
        matryoshka.matryoshka_loss(losses.gte_loss, q, d, dims=(64, 8))
    with pytest.raises(ValueError, match="distinct"):
        matryoshka.sorted_dims((8, 8))
    with pytest.raises(ValueError, match="2 matryoshka weights for 3 dims"):
        matryoshka.sorted_dims((8, 4, 2), (1.0, 1.0))


def test_truncation_is_a_renormalised_prefix_for_numpy_and_jax():
    _, _, neg = _case()
    want = _np_truncate(neg, 16)
    got_np = truncate_embeddings(neg, 16)
    assert isinstance(got_np, np.ndarray)
    np.testing.assert_allclose(got_np, want, rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(truncate_embeddings(jnp.asarray(neg), 16)), want, atol=1e-6
    )
    assert truncate_embeddings(neg, None) is neg
    np.testing.assert_array_equal(truncate_embeddings(neg, 16, normalize=False), neg[..., :16])
    with pytest.raises(ValueError, match="must be in"):
        truncate_embeddings(neg, 49)


# ------------------------------------------------------------------------- learnable temperature


@pytest.mark.parametrize("name", ["gte", "infonce", "instructor"])
def test_temperature_gradient_matches_finite_differences(name):
    q, d, neg = _case(seed=3)
    low, high = 0.005, 1.0

    def loss(theta):
        tau = temperature.temperature(theta, low, high)
        return losses.contrastive_loss(name, q, d, neg=neg, temperature=tau)[0]

    with jax.enable_x64(True):
        theta = jnp.asarray(temperature.initial_theta(0.05, low, high), jnp.float64)
        grad = float(jax.grad(loss)(theta))
        h = 1e-5
        fd = (float(loss(theta + h)) - float(loss(theta - h))) / (2 * h)
    assert grad != 0.0
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


def test_temperature_stays_inside_its_bounds_and_starts_where_asked():
    low, high = 0.01, 0.5
    theta0 = temperature.initial_theta(0.05, low, high)
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            float(temperature.temperature(jnp.float64(theta0), low, high)), 0.05, rtol=1e-12
        )
        taus = np.asarray(temperature.temperature(jnp.linspace(-40.0, 40.0, 81), low, high))
    assert np.all((taus >= low) & (taus <= high))
    assert np.all(np.diff(taus) >= 0)
    assert np.all(np.diff(taus[30:51]) > 0)  # strictly increasing where float64 resolves it
    assert taus[0] < low * 1.001 and taus[-1] > high * 0.999
    for bad in ((0.01, 0.01, 0.5), (0.6, 0.01, 0.5), (0.05, 0.0, 0.5)):
        with pytest.raises(ValueError, match="0 < min"):
            temperature.initial_theta(*bad)


# ------------------------------------------------------------------------------- distillation


def _np_kl(student, teacher, ts, tt, keep):
    """float64 loops of (1/n) Σ_i Σ_j p_ij (log p_ij - log r_ij) over the kept candidates."""
    total = 0.0
    for i in range(len(student)):
        cols = [j for j in range(student.shape[1]) if keep[i, j]]
        s = np.array([student[i, j] / ts for j in cols])
        t = np.array([teacher[i, j] / tt for j in cols])
        log_r = s - (s.max() + np.log(np.sum(np.exp(s - s.max()))))
        log_p = t - (t.max() + np.log(np.sum(np.exp(t - t.max()))))
        total += float(np.sum(np.exp(log_p) * (log_p - log_r)))
    return total / len(student)


def test_distill_loss_matches_numpy_and_torch_kl_div():
    q, d, neg = _case(n=5, k=3, seed=4)
    rng = np.random.default_rng(5)
    teacher = rng.uniform(-0.2, 0.9, size=(5, 4))
    student = np.concatenate([np.sum(q * d, -1)[:, None], np.einsum("nd,nkd->nk", q, neg)], 1)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(distill.student_scores(q, d, neg)), student, 1e-12)
        got = float(
            distill.distill_loss(
                student, teacher, student_temperature=0.05, teacher_temperature=0.1
            )
        )
    want = _np_kl(student, teacher, 0.05, 0.1, np.ones((5, 4), bool))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    f = torch.nn.functional
    kl = f.kl_div(
        f.log_softmax(torch.tensor(student) / 0.05, -1),
        f.softmax(torch.tensor(teacher) / 0.1, -1),
        reduction="batchmean",
    )
    np.testing.assert_allclose(got, float(kl), rtol=1e-10)


def test_distill_leaves_out_placeholders_and_padding_rows():
    rng = np.random.default_rng(6)
    student, teacher = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    neg_valid = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1]])
    valid = np.array([1, 1, 1, 0])
    keep = np.concatenate([np.ones((4, 1), int), neg_valid], 1).astype(bool)
    with jax.enable_x64(True):
        got = float(
            distill.distill_loss(
                student, teacher, student_temperature=0.5, teacher_temperature=0.3,
                valid=valid, neg_valid=neg_valid,
            )
        )  # fmt: skip
    want = _np_kl(student[:3], teacher[:3], 0.5, 0.3, keep[:3])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # A student equal to the teacher (same temperature) has KL 0.
    same = distill.distill_loss(teacher, teacher, student_temperature=1.0, teacher_temperature=1.0)
    assert abs(float(same)) < 1e-6


def test_with_distillation_adds_the_weighted_kl_and_gets_no_teacher_gradient():
    q, d, neg = _case(n=4, k=2, seed=7)
    teacher = np.random.default_rng(8).uniform(0, 1, size=(4, 3))
    combined = distill.with_distillation(losses.infonce_loss, weight=0.7, teacher_temperature=0.1)
    with jax.enable_x64(True):
        total, metrics = combined(q, d, neg=neg, temperature=0.05, teacher_scores=teacher)
        base, _ = losses.infonce_loss(q, d, neg=neg, temperature=0.05)
        alone, _ = combined(q, d, neg=neg, temperature=0.05)
        g_teacher = jax.grad(
            lambda t: combined(q, d, neg=neg, temperature=0.05, teacher_scores=t)[0]
        )(jnp.asarray(teacher))
        student = np.asarray(distill.student_scores(q, d, neg))
    kd = _np_kl(student, teacher, 0.05, 0.1, np.ones((4, 3), bool))
    np.testing.assert_allclose(float(total), float(base) + 0.7 * kd, rtol=1e-10)
    np.testing.assert_allclose(float(metrics["distill_loss"]), kd, rtol=1e-10)
    assert float(alone) == float(base)
    assert not np.any(np.asarray(g_teacher))


def test_the_train_steps_objective_applies_matryoshka_and_distillation():
    """The objective the train step runs (objectives.from_config's loss_fn) with the loss.*
    options == the pure functions; without them, the plain loss."""
    import dataclasses

    from gte_jax import objectives

    q, d, neg = _case(n=4, k=2, seed=9)
    teacher = np.random.default_rng(10).uniform(0, 1, size=(4, 3))
    batch = {"teacher_scores": teacher}
    emb = {"query": q, "doc": d, "neg": neg}
    infonce = dataclasses.replace(objectives.get("infonce"), temperature=0.05, block_size=None)
    fn = dataclasses.replace(
        infonce, matryoshka_dims=(48, 8), matryoshka_weights=(1.0, 0.5),
        distill_weight=0.3, teacher_temperature=0.1,
    ).loss_fn()  # fmt: skip
    with jax.enable_x64(True):
        got, metrics = fn(emb, batch)
        mat, _ = matryoshka.matryoshka_loss(
            losses.infonce_loss, q, d, neg=neg, dims=(48, 8), weights=(1.0, 0.5), temperature=0.05
        )
        kd = distill.distill_loss(
            distill.student_scores(q, d, neg), teacher, student_temperature=0.05,
            teacher_temperature=0.1,
        )  # fmt: skip
        plain, _ = infonce.loss_fn()(emb, batch)
    np.testing.assert_allclose(float(got), float(mat) + 0.3 * float(kd), rtol=1e-10)
    assert "loss_dim8" in metrics and "distill_loss" in metrics
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            float(plain), float(losses.infonce_loss(q, d, neg=neg, temperature=0.05)[0]), 1e-12
        )


def test_inconsistent_matryoshka_settings_are_refused_naming_the_key():
    from gte_jax.defaults import stage_config
    from gte_jax.train import matryoshka_problems

    lcfg = stage_config().loss
    assert matryoshka_problems(lcfg) == []
    lcfg.matryoshka_dims = (32, 16)
    lcfg.matryoshka_weights = (1.0,)
    assert matryoshka_problems(lcfg)[0].startswith("loss.matryoshka_dims=[32, 16]: 1 matryoshka")
    lcfg.matryoshka_weights = (1.0, -1.0)
    assert "weights must be >= 0" in matryoshka_problems(lcfg)[0]
