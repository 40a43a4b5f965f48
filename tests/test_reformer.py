"""The Reformer baseline (reformer.py) against plain attention, causality, and its hashing."""
import pytest
import torch
import torch.nn.functional as F

from reformer import SELF_LOGIT, LSHAttention, ReformerConfig, hash_buckets


def shared_key_attention(q, v):
    """Plain causal softmax with shared, normalised keys; a token's own key only when alone."""
    T, D = q.shape[-2:]
    logits = q @ F.normalize(q, dim=-1).transpose(-2, -1) * D ** -0.5
    logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return logits.masked_fill(torch.eye(T, dtype=torch.bool), SELF_LOGIT).softmax(-1) @ v


@pytest.mark.parametrize("official", [False, True])
def test_one_round_that_sees_every_key_is_plain_attention(official):
    torch.manual_seed(0)
    c = 8
    # ours: one bucket, each query sees its 2c most recent keys; official: two chunks that see each other
    cfg = ReformerConfig(bucket_size=c, n_hashes=1, n_buckets=2 if official else 1, official_chunks=official)
    T = 2 * c if official else 2 * c + 1
    q, v = torch.randn(2, 3, T, 16), torch.randn(2, 3, T, 16)
    out, _ = LSHAttention(16, 64, cfg).eval()(q, None, v)
    torch.testing.assert_close(out, shared_key_attention(q, v))


def outputs_for_two_futures(official, p=40):
    """Outputs of two sequences that agree up to position p and differ after it."""
    torch.manual_seed(0)
    attention = LSHAttention(16, 256, ReformerConfig(bucket_size=4, n_hashes=4, official_chunks=official)).eval()
    q, v = torch.randn(1, 2, 96, 16), torch.randn(1, 2, 96, 16)
    q2, v2 = q.clone(), v.clone()
    q2[:, :, p + 1:], v2[:, :, p + 1:] = torch.randn(1, 2, 96 - p - 1, 16), torch.randn(1, 2, 96 - p - 1, 16)
    return attention(q, None, v)[0][:, :, :p + 1], attention(q2, None, v2)[0][:, :, :p + 1]


def test_later_tokens_never_change_earlier_outputs():
    a, b = outputs_for_two_futures(official=False)
    torch.testing.assert_close(a, b)


def test_the_official_chunking_leaks_the_future():
    a, b = outputs_for_two_futures(official=True)
    assert not torch.allclose(a, b)  # why reformer.py does it differently


def test_a_vector_always_lands_in_the_same_bucket_and_buckets_are_balanced():
    torch.manual_seed(0)
    rotations = torch.randn(16, 2, 8)  # 2 rounds of 16 buckets
    x = torch.randn(1, 4096, 16)
    buckets = hash_buckets(x, rotations)
    same = torch.cat([x[:, :10], 3 * x[:, :10], x[:, :10]], dim=1)  # repeated, and scaled
    repeated = hash_buckets(same, rotations)
    assert torch.equal(repeated[..., :10], buckets[..., :10]) and torch.equal(repeated[..., 10:20], buckets[..., :10])
    assert len(buckets.unique()) == 16
    # one Gaussian rotation favours some buckets; over many rotations every bucket is equally likely
    draws = hash_buckets(x[:, :512], torch.randn(16, 200, 8))
    counts = torch.bincount(draws.flatten(), minlength=16).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1


def test_evaluation_is_repeatable_training_draws_fresh_rotations():
    torch.manual_seed(0)
    attention = LSHAttention(16, 128, ReformerConfig(bucket_size=4, n_hashes=2))
    q, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    evaluated = [attention.eval()(q, None, v)[0] for _ in range(2)]
    trained = [attention.train()(q, None, v)[0] for _ in range(2)]
    assert torch.equal(evaluated[0], evaluated[1]) and not torch.equal(trained[0], trained[1])
    attention.cfg.eval_seed = 1
    assert not torch.equal(attention.eval()(q, None, v)[0], evaluated[0])
