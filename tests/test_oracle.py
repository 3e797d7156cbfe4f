"""blade.train.oracle: the exact one-step bi-level choice. The mathematics against closed forms and
autograd token by token; in runs: the same on 1 and 2 ranks, the trial step is the engine's step, the
forwards it adds (none when off), and training bitwise unchanged with it on."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import vjp, vmap

from blade.config import ModelConfig, OptimConfig, load_config
from blade.errors import ConfigError
from blade.model.transformer import IGNORE_INDEX, Transformer
from blade.train import oracle
from tests.conftest import TINY, tiny_overrides

# ----------------------------------------------------------------------------- a softmax-regression model

D, V, N_IN = 3, 4, 6


def _linear_model(seed=0):
    """l_i = CE(softmax(phi[x_i] W + b), y_i): per-token gradients in closed form."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(N_IN, D, generator=g)
    params = {"W": torch.randn(D, V, generator=g), "b": torch.randn(V, generator=g)}

    def loss_fn(p, inputs, targets):
        logits = phi[inputs] @ p["W"] + p["b"]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none").view(targets.shape)

    def closed_form_grads(p, inputs, targets):
        """[n_tokens, D*V + V]: dW_i = x_i (softmax - onehot)^T, db_i = softmax - onehot; 0 if ignored."""
        x = phi[inputs].flatten(0, 1)
        r = torch.softmax(x @ p["W"] + p["b"], -1)
        valid = targets.flatten() != IGNORE_INDEX
        r[torch.arange(len(r)), targets.flatten().clamp(min=0)] -= 1
        r = r * valid[:, None]
        return torch.cat([(x[:, :, None] * r[:, None, :]).flatten(1), r], 1)

    return params, loss_fn, closed_form_grads


def _batch(seed, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    inputs, targets = torch.randint(0, N_IN, shape, generator=g), torch.randint(0, V, shape, generator=g)
    targets[0, 1] = IGNORE_INDEX
    return inputs, targets


def _flat(d):
    return torch.cat([d["W"].flatten(), d["b"].flatten()])


def test_per_token_gradients_and_first_order_scores_match_the_closed_form_and_autograd():
    params, loss_fn, closed = _linear_model()
    inputs, targets = _batch(1)
    per_token = closed(params, inputs, targets)
    # autograd, token by token
    for i in range(targets.numel()):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss_fn(p, inputs, targets).flatten()[i].backward()
        assert torch.allclose(_flat({k: v.grad for k, v in p.items()}), per_token[i], atol=1e-6)
    # torch.func: vmap over the pullback of every token
    out, pullback = vjp(lambda p: loss_fn(p, inputs, targets).flatten(), params)
    rows = vmap(pullback)(torch.eye(out.numel()))[0]
    assert torch.allclose(torch.cat([rows["W"].flatten(1), rows["b"]], 1), per_token, atol=1e-6)
    # the target gradient and the first-order scores o_i = g_i . g_T
    t_inputs, t_targets = _batch(2, (2, 4))
    g_target = closed(params, t_inputs, t_targets).sum(0) / (t_targets != IGNORE_INDEX).sum()
    direction = {"W": g_target[:D * V].view(D, V), "b": g_target[D * V:]}
    losses, scores = oracle.first_order_scores(loss_fn, params, inputs, targets, direction)
    assert torch.allclose(scores.flatten(), per_token @ g_target, atol=1e-6)
    assert torch.allclose(losses, loss_fn(params, inputs, targets))
    grad = torch.func.grad(lambda p: oracle.mean_loss(loss_fn, p, t_inputs, t_targets))(params)
    assert torch.allclose(_flat(grad).float(), g_target, atol=1e-6)


def _manual_adamw(theta, g, m, v, steps, lr, wd, o):
    theta = theta * (1 - lr * wd)
    m, v = o.beta1 * m + (1 - o.beta1) * g, o.beta2 * v + (1 - o.beta2) * g * g
    t = steps + 1
    return theta - lr / (1 - o.beta1 ** t) * m / (v.sqrt() / math.sqrt(1 - o.beta2 ** t) + o.eps)


def test_the_trial_step_is_adamw_with_clipping_and_the_realised_change_matches_a_manual_step():
    params, loss_fn, closed = _linear_model()
    inputs, targets = _batch(3)
    t_inputs, t_targets = _batch(4, (2, 4))
    g = torch.Generator().manual_seed(5)
    m = {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    v2 = {k: torch.rand(v.shape, generator=g) for k, v in params.items()}
    o, lr, wd = OptimConfig(grad_clip=0.5, weight_decay=0.1), 0.05, {"W": 0.1, "b": 0.0}
    valid = (targets != IGNORE_INDEX).flatten()
    own = torch.zeros_like(valid)
    own[[0, 2, 3, 5, 8, 9, 12, 14]] = True
    snap = oracle.Snapshot(params=params, exp_avg=m, exp_avg_sq=v2, steps=3, weight_decay=wd, inputs=inputs,
                           targets=targets, mask=own, scores=torch.randn(valid.shape, generator=g),
                           random_keys=torch.rand(valid.shape, generator=g))
    rec = oracle.compare(loss_fn, snap, (t_inputs, t_targets), "blade", gamma=0.6, eta=1.0, lr=lr, o=o)

    def target_loss(p):
        return float(oracle.mean_loss(loss_fn, p, t_inputs, t_targets))

    per_token = closed(params, inputs, targets)
    g_target = closed(params, t_inputs, t_targets).sum(0) / (t_targets != IGNORE_INDEX).sum()
    first_order = per_token @ g_target
    k = math.ceil(0.6 * int(valid.sum()))
    assert rec["k"] == k == 9 and rec["target_loss"] == pytest.approx(target_loss(params))
    grad = per_token[own & valid].mean(0)  # the engine's gradient of the mean loss over the set
    assert grad.norm() > 0.5  # so the clipping is exercised
    grad = grad * 0.5 / (grad.norm() + 1e-6)
    theta = {"W": _manual_adamw(params["W"], grad[:D * V].view(D, V), m["W"], v2["W"], 3, lr, 0.1, o),
             "b": _manual_adamw(params["b"], grad[D * V:], m["b"], v2["b"], 3, lr, 0.0, o)}
    assert rec["dl_blade"] == pytest.approx(target_loss(theta) - target_loss(params), rel=1e-4, abs=1e-7)
    assert rec["fo_blade"] == pytest.approx(float(first_order[own & valid].mean()), rel=1e-5)
    # the oracle set is the best set of k to first order (brute force over all of them)
    best = max(float(first_order[list(s)].mean()) for s in itertools.combinations(valid.nonzero().flatten().tolist(), k))
    assert rec["fo_oracle"] == pytest.approx(best, rel=1e-5)
    assert all(rec["fo_oracle"] >= rec[f"fo_{s}"] - 1e-6 for s in ("blade", "random", "loss", "full"))
    # rankings: Spearman of the scores and the precision of each set against the oracle set
    oracle_set = set(first_order.topk(k).indices.tolist())
    assert rec["precision_blade"] == pytest.approx(len(oracle_set & set(own.nonzero().flatten().tolist())) / k)
    def rank(x):  # how many are below, plus half of the others equal to it (tokens can repeat)
        return torch.tensor([float((x < v).sum() + ((x == v).sum() - 1) / 2) for v in x], dtype=torch.float64)

    ra, rb = rank(snap.scores[valid]), rank(first_order[valid])
    assert rec["spearman_blade"] == pytest.approx(float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]), rel=1e-6)
    assert rec["gain_blade"] == pytest.approx((rec["dl_random"] - rec["dl_blade"]) /
                                              (rec["dl_random"] - rec["dl_oracle"]))


def test_average_ranks_share_ties_and_top_k_keeps_the_lower_position():
    assert oracle.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    assert math.isnan(oracle.spearman(torch.zeros(5), torch.arange(5.0)))
    valid = torch.tensor([True, True, False, True, True])
    assert oracle.top_k(torch.tensor([1.0, 2.0, 9.0, 2.0, 0.0]), valid, 2).tolist() == [False, True, False, True,
                                                                                         False]


def test_transformer_first_order_scores_match_autograd_token_by_token():
    """The plain-op losses equal the model's own (chunked head); J.g_T equals g_i . g_T from backward
    passes through the model's own forward, token by token."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32,
                                    max_seq_len=8)).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    inputs, targets = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    targets[1, 3] = IGNORE_INDEX
    loss_fn = oracle.transformer_token_losses(model)
    assert torch.allclose(loss_fn(params, inputs, targets), model(inputs, targets).detach(), atol=1e-5)
    model.zero_grad()
    (model(inputs[:1], targets[:1]).mean()).backward()
    g_target = {k: v.grad.clone() for k, v in model.named_parameters()}
    _, scores = oracle.first_order_scores(loss_fn, params, inputs, targets, g_target)
    for b, t in itertools.product(range(2), range(8)):
        model.zero_grad()
        model(inputs, targets)[b, t].backward()
        expected = sum(float((p.grad * g_target[k]).sum()) for k, p in model.named_parameters() if p.grad is not None)
        assert scores[b, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-7), (b, t)


# ----------------------------------------------------------------------------- config


def test_refusals_are_one_line(builtin_data, tmp_path):
    base = tiny_overrides(builtin_data, str(tmp_path / "r"), "selection.exact_interval=5")
    oracle.check_config(load_config(TINY, base))  # tiny: fine
    with pytest.raises(ConfigError, match=r"at most 2,000,000 parameters \(this one has 4,"):
        oracle.check_config(load_config(TINY, [*base, "model.dim=512", "model.ffn_hidden=1024"]))
    with pytest.raises(ConfigError, match="exact_interval needs data.target"):
        load_config(TINY, [*base, "data.target=null"])
    with pytest.raises(ConfigError, match="bf16 needs deepspeed.zero_stage >= 1"):
        load_config(TINY, [*base, "train.precision=bf16", "deepspeed.zero_stage=0"])
    with pytest.raises(ConfigError, match="exact_interval must be >= 0"):
        load_config(TINY, [*base, "selection.exact_interval=-1"])


# ----------------------------------------------------------------------------- in runs (gloo ranks)


def _steps(rank, world, runs, steps):
    """For each run: forwards per step (each engine's, and of every Transformer), the oracle records
    (rank 0), and the target loss of the engine's weights after each oracle step."""
    from blade.config import load_config
    from blade.runtime import zero
    from blade.runtime.dist import World
    from blade.train import schedule
    from blade.train.loop import Trainer

    original = Transformer.forward
    counts = {"proxy": 0, "reference": 0, "any": 0}

    def counting(self, *args, **kwargs):
        counts["any"] += 1
        return original(self, *args, **kwargs)

    Transformer.forward = counting
    out = []
    for overrides in runs:
        tr = Trainer(load_config(TINY, overrides), World(rank, world, rank, "cpu"))
        for name, engine in tr.engines.by_name().items():
            engine.module.register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
        records, log = [], tr.log.log
        tr.log.log = lambda r: (records.append(r), log(r))
        per_step, after = [], []
        exact = tr.stepper.oracle
        for step in range(steps):
            if schedule.reference_phase_before(tr.cfg.selection, step):
                tr.stepper.reference_phase(step)
            before = dict(counts)
            tr.stepper.train_step(step)
            per_step.append({k: counts[k] - before[k] for k in counts})
            if exact.due(step):
                params = zero.full_fp32_state(tr.engines.proxy)
                if rank == 0:
                    with zero.plain_linear():
                        after.append(float(oracle.mean_loss(exact.loss_fn, params, *exact.target)))
        out.append({"counts": per_step, "records": [r for r in records if r["kind"] == "oracle"],
                    "after": after, "built": exact.loss_fn is not None})
        tr.log.close()
    Transformer.forward = original
    return out


def _without_time(record):
    return {k: v for k, v in record.items() if k != "time_oracle_s"}


def test_the_same_on_one_and_two_ranks(tmp_path, builtin_data):
    """The global batch of 2 ranks x 1 micro-batch is that of 1 rank x 2: the first measurement is
    bitwise equal, later ones (weights differ by the summation order of the gradients) within 1e-4."""
    from tests.dist_harness import run_distributed

    def runs(name, ga):
        return [tiny_overrides(builtin_data, str(tmp_path / f"{name}{s}"), f"selection.strategy={s}",
                               f"train.grad_accum={ga}", "selection.exact_interval=1", "selection.k_ref_steps=2")
                for s in ("random", "blade")]

    one = run_distributed(_steps, 1, deepspeed=True, args=(runs("one", 2), 2))[0]
    two = run_distributed(_steps, 2, deepspeed=True, args=(runs("two", 1), 2))
    assert two[1][0]["records"] == [] and two[1][1]["records"] == []  # rank 0 alone measures and logs
    for a, b in zip(one, two[0]):
        assert [r["step"] for r in a["records"]] == [r["step"] for r in b["records"]] == [0, 1]
    random1, random2 = one[0]["records"], two[0][0]["records"]
    assert _without_time(random1[0]) == _without_time(random2[0])
    for a, b in zip(random1[1:] + one[1]["records"], random2[1:] + two[0][1]["records"]):
        for key, value in a.items():
            if key != "time_oracle_s" and isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (a["strategy"], a["step"], key)


def test_the_trial_step_is_the_engines_and_the_forwards_it_adds(tmp_path, builtin_data):
    """With the oracle on, the engines run the forwards they run without it; the only extra forwards
    are the oracle's own (on rank 0, as many as its record says); the realised change of the run's own
    set is the change the engine's update then makes. Off: no extra forward, nothing built."""
    from tests.dist_harness import run_distributed

    runs = [tiny_overrides(builtin_data, str(tmp_path / f"r{i}"), "selection.strategy=blade",
                           "selection.k_ref_steps=1", f"selection.exact_interval={i}") for i in (1, 0)]
    on, off = zip(*run_distributed(_steps, 2, deepspeed=True, args=(runs, 2)))
    for rank in (0, 1):
        assert [c["proxy"] for c in on[rank]["counts"]] == [c["proxy"] for c in off[rank]["counts"]] == [1, 1]
        assert [c["reference"] for c in on[rank]["counts"]] == [1, 1]
        assert all(c["any"] == c["proxy"] + c["reference"] for c in off[rank]["counts"])
        assert not off[rank]["built"] and not off[rank]["records"]
    extra = [c["any"] - c["proxy"] - c["reference"] for c in on[0]["counts"]]
    assert extra == [r["forwards"] for r in on[0]["records"]] == [3 + 5, 3 + 5]  # sets: oracle blade random loss full
    assert all(c["any"] == c["proxy"] + c["reference"] for c in on[1]["counts"])
    for record, loss_after in zip(on[0]["records"], on[0]["after"]):
        assert record["target_loss"] + record["dl_blade"] == pytest.approx(loss_after, abs=2e-6)


def test_training_is_bitwise_unchanged_with_the_oracle_on(tmp_path, builtin_data):
    """Dropout on: a single draw from the global RNG by the oracle would change every later loss."""
    import sys

    from tests.test_loop import run

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tools"))
    from compare_metrics import compare

    args = ("selection.strategy=blade", "train.steps=4", "selection.tau=2", "selection.k_ref_steps=1",
            "train.eval_interval=2", "model.dropout=0.1", "selection.diag_interval=2")
    run(tmp_path, builtin_data, "off", 2, *args)
    _, records, _ = run(tmp_path, builtin_data, "on", 2, *args, "selection.exact_interval=1")
    assert [r["step"] for r in records if r["kind"] == "oracle"] == [0, 1, 2, 3]
    on = tmp_path / "on" / "metrics.jsonl"
    on.write_text("".join(line for line in on.read_text().splitlines(keepends=True) if '"oracle"' not in line))
    assert compare(str(tmp_path / "off"), str(tmp_path / "on")) == []
