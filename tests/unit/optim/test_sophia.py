"""SophiaG: a hand-computed step, equality with the authors' rule, a quadratic, SOUL's variant."""

import math

import pytest
import torch

from ray_unlearn.optim.sophia import SophiaG, sophia_update


# ----------------------------------------------------------- reference (transcribed, not imported)
# Liu et al., github.com/Liuhong99/Sophia sophia.py: SophiaG.update_hessian and _single_tensor_sophiag.
def ref_update_hessian(grads, hessians, beta2):
    for g, h in zip(grads, hessians):
        if g is None:
            continue
        h.mul_(beta2).addcmul_(g, g, value=1 - beta2)


def ref_step(params, grads, exp_avgs, hessians, *, bs, beta1, rho, lr, weight_decay):
    for param, grad, exp_avg, hess in zip(params, grads, exp_avgs, hessians):
        if grad is None:
            continue
        param.mul_(1 - lr * weight_decay)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        ratio = (exp_avg.abs() / (rho * bs * hess + 1e-15)).clamp(None, 1)
        param.addcmul_(exp_avg.sign(), ratio, value=-lr)


# SOUL (Jia et al.), src/optim/sophia.py: step() = update_hessian(); update_exp_avg(); reference rule.
def soul_step(params, grads, exp_avgs, hessians, *, beta1, beta2, rho, lr, weight_decay):
    ref_update_hessian(grads, hessians, beta2)
    for g, m in zip(grads, exp_avgs):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
    ref_step(params, grads, exp_avgs, hessians, bs=5120, beta1=beta1, rho=rho, lr=lr, weight_decay=weight_decay)


# ----------------------------------------------------------- hand-computed step
def test_single_step_by_hand():
    # lr 0.1, b1 = b2 = 0.5, rho 0.5, wd 0.1, bs 4; theta = [1, 2, -1], g = [0.4, -0.2, 0.8], h_hat = [2, 0.01, 1]
    # update_hessian: h = 0.5*0 + 0.5*h_hat = [1, 0.005, 0.5]
    # m = 0.5*0 + 0.5*g = [0.2, -0.1, 0.4];  rho*bs*h = 2h = [2, 0.01, 1]
    # ratio = min(|m| / 2h, 1) = [0.1, min(10, 1) = 1 (clipped), 0.4]
    # decay: theta*(1 - 0.1*0.1) = [0.99, 1.98, -0.99]
    # theta - lr*sign(m)*ratio = [0.99 - 0.01, 1.98 + 0.1, -0.99 - 0.04] = [0.98, 2.08, -1.03]
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    p.grad = torch.tensor([0.4, -0.2, 0.8], dtype=torch.float64)
    opt = SophiaG([p], lr=0.1, betas=(0.5, 0.5), rho=0.5, weight_decay=0.1)
    opt.update_hessian([torch.tensor([2.0, 0.01, 1.0], dtype=torch.float64)])
    opt.step(bs=4)
    torch.testing.assert_close(p.detach(), torch.tensor([0.98, 2.08, -1.03], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64))
    assert opt.clip_rate == pytest.approx(2 / 3)  # coordinates 0 and 2 not clipped


def test_sophia_update_returns_not_clipped_count():
    # same numbers as above through the pure function, with h already [1, 0.005, 0.5]
    p = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    m = torch.zeros(3, dtype=torch.float64)
    kept = sophia_update(p, torch.tensor([0.4, -0.2, 0.8], dtype=torch.float64), m,
                         torch.tensor([1.0, 0.005, 0.5], dtype=torch.float64),
                         lr=0.1, beta1=0.5, rho=0.5, weight_decay=0.1, bs=4)
    assert kept == 2
    torch.testing.assert_close(p, torch.tensor([0.98, 2.08, -1.03], dtype=torch.float64))


def test_zero_hessian_is_sign_descent():
    # h = 0: every coordinate clipped, theta moves by exactly lr*sign(m); clip_rate 0
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    p.grad = torch.tensor([3.0, -0.001])
    opt = SophiaG([p], lr=0.01, weight_decay=0.0)
    opt.step(bs=1)
    torch.testing.assert_close(p.detach(), torch.tensor([0.99, -0.99]))
    assert opt.clip_rate == 0.0


def test_negative_hessian_is_a_sign_step():
    """Hutchinson's h can be negative: max(rho*bs*h, 0) keeps the ratio in [0, 1] (the paper's max(gamma*h, eps)),
    so such a coordinate moves by exactly lr along -sign(m) instead of an unbounded step against it.
    lr 0.1, b1 0.5, wd 0, bs 1, rho 1: m = [0.2, -0.4]; h = [-3, 0.8] -> ratios [1, 0.5] -> theta - [0.1, -0.05]."""
    p = torch.tensor([1.0, 1.0], dtype=torch.float64)
    m = torch.zeros(2, dtype=torch.float64)
    kept = sophia_update(p, torch.tensor([0.4, -0.8], dtype=torch.float64), m,
                         torch.tensor([-3.0, 0.8], dtype=torch.float64), lr=0.1, beta1=0.5, rho=1.0,
                         weight_decay=0.0, bs=1)
    assert kept == 1
    torch.testing.assert_close(p, torch.tensor([0.9, 1.05], dtype=torch.float64))


# ----------------------------------------------------------- equality with the reference, many steps
def _params(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3,), (4, 5), (2, 3, 2)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]


@pytest.mark.parametrize("maximize", [False, True])
def test_matches_reference_over_steps(maximize):
    ours = _params(0)
    ref = [p.detach().clone() for p in ours]
    groups = [{"params": ours[:2]}, {"params": ours[2:], "lr": 3e-3, "weight_decay": 0.0}]
    hyper = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0)]
    opt = SophiaG(groups, lr=1e-2, betas=(0.9, 0.95), rho=0.04, weight_decay=0.1, maximize=maximize)
    m = [torch.zeros_like(p) for p in ref]
    h = [torch.zeros_like(p) for p in ref]
    gen = torch.Generator().manual_seed(1)
    k, bs = 3, 64.0
    for step in range(12):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ref]
        grads[1] = None if step == 5 else grads[1]  # a param without grad this step is skipped
        for p, g in zip(ours, grads):
            p.grad = None if g is None else g.clone()
        signed = [None if g is None else (-g if maximize else g) for g in grads]
        if step % k == 0:
            if step % 2 == 0:  # reference protocol: p.grad * p.grad
                opt.update_hessian()
                ref_update_hessian(grads, h, 0.95)
            else:  # explicit estimates
                ests = [torch.rand(p.shape, generator=gen, dtype=torch.float64) * 1e-3 for p in ref]
                opt.update_hessian(ests)
                for hh, e in zip(h, ests):
                    hh.mul_(0.95).add_(e, alpha=0.05)
        opt.step(bs=bs)
        for idx, hp in ((slice(0, 2), hyper[0]), (slice(2, 3), hyper[1])):
            ref_step(ref[idx], signed[idx], m[idx], h[idx], bs=bs, beta1=0.9, rho=0.04, **hp)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-12)


def test_update_hessian_checks_alignment():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = SophiaG([p, q])
    with pytest.raises(ValueError, match="2 trainable params"):
        opt.update_hessian([torch.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        opt.update_hessian([torch.ones(3), torch.ones(2)])


def test_state_dict_round_trip():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 0.5)
    opt = SophiaG([p])
    opt.update_hessian()
    opt.step()
    fresh = SophiaG([p])
    fresh.load_state_dict(opt.state_dict())
    torch.testing.assert_close(fresh.state[p]["hessian"], opt.state[p]["hessian"])
    torch.testing.assert_close(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])


# ----------------------------------------------------------- quadratic with a known Hessian
D = torch.logspace(-2, 2, 9, dtype=torch.float64)  # f(x) = 1/2 sum d_i x_i^2, H = diag(d)


def _run_sophia_on_quadratic(steps, x0):
    x = torch.nn.Parameter(torch.full_like(D, x0))
    opt = SophiaG([x], lr=0.5, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0)
    for _ in range(steps):
        x.grad = D * x.detach()
        opt.update_hessian([D])  # exact Hessian; b2 = 0 so h = diag(H)
        opt.step(bs=1)
    return x.detach()


def test_converges_on_ill_conditioned_quadratic():
    # rho*bs*h = d and m = g = d*x, so the ratio is |x| (clipped at 1): every coordinate moves
    # by lr*min(|x|, 1) toward 0 whatever its curvature, i.e. x <- x/2 once |x| < 1.
    x = _run_sophia_on_quadratic(60, 3.3)
    assert x.abs().max() < 1e-9

    # plain GD with the same lr: x <- (1 - lr*d) x diverges where d = 100 and barely moves where d = 0.01
    gd = torch.full_like(D, 3.3)
    for _ in range(60):
        gd = gd - 0.5 * D * gd
    assert gd[0].abs() > 0.7 * 3.3 and gd[-1].abs() > 1e6

    # sign descent with the same lr stalls at the lr scale on every coordinate
    sd = torch.full_like(D, 3.3)
    for _ in range(60):
        sd = sd - 0.5 * torch.sign(D * sd)
    assert sd.abs().min() > 0.1


def test_unclipped_step_is_preconditioned():
    # one step: unclipped coordinates move by lr*|m|/(rho*bs*h), clipped ones by exactly lr
    gen = torch.Generator().manual_seed(2)
    x = torch.nn.Parameter(torch.randn(50, generator=gen, dtype=torch.float64))
    g = torch.randn(50, generator=gen, dtype=torch.float64)
    h = torch.rand(50, generator=gen, dtype=torch.float64) * 2
    lr, rho, bs = 1e-2, 0.04, 10.0
    opt = SophiaG([x], lr=lr, betas=(0.9, 0.0), rho=rho, weight_decay=0.0)
    before = x.detach().clone()
    x.grad = g
    opt.update_hessian([h])
    opt.step(bs=bs)
    m = 0.1 * g
    pre = lr * m.abs() / (rho * bs * h)
    moved = (x.detach() - before).abs()
    unclipped = pre < lr
    assert 0 < unclipped.sum() < 50
    torch.testing.assert_close(moved[unclipped], pre[unclipped])
    torch.testing.assert_close(moved[~unclipped], torch.full_like(moved[~unclipped], lr))
    assert opt.clip_rate == pytest.approx(unclipped.double().mean().item())


# ----------------------------------------------------------- SOUL compatibility
def test_soul_compat_update_hessian_folds_momentum_once():
    # reference update_hessian leaves m alone; soul_compat also does m <- b1*m + (1-b1)*g
    for soul, expected in ((False, [0.0, 0.0]), (True, [0.1, -0.2])):
        p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        p.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
        opt = SophiaG([p], betas=(0.9, 0.95), soul_compat=soul)
        opt.update_hessian()
        torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(opt.state[p]["hessian"], 0.05 * p.grad * p.grad)


def test_soul_compat_matches_soul_code():
    # empirical estimate every step + step(bs=5120) reproduces SOUL's step() (transcribed above)
    ours = _params(3)
    ref = [p.detach().clone() for p in ours]
    m = [torch.zeros_like(p) for p in ref]
    h = [torch.zeros_like(p) for p in ref]
    opt = SophiaG(ours, lr=1e-3, betas=(0.9, 0.95), rho=0.04, weight_decay=0.1, soul_compat=True)
    gen = torch.Generator().manual_seed(4)
    for _ in range(8):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * 1e-2 for p in ref]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.update_hessian([p.grad * p.grad for p in ours])
        opt.step(bs=5120)
        soul_step(ref, grads, m, h, beta1=0.9, beta2=0.95, rho=0.04, lr=1e-3, weight_decay=0.1)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-12)


def test_soul_compat_is_reference_with_beta1_squared():
    # documented equivalence: b1*(b1*m + (1-b1)*g) + (1-b1)*g = b1^2*m + (1-b1^2)*g
    soul, plain = _params(5), _params(5)
    opt_soul = SophiaG(soul, lr=1e-2, betas=(0.9, 0.95), soul_compat=True)
    opt_plain = SophiaG(plain, lr=1e-2, betas=(0.81, 0.95))
    gen = torch.Generator().manual_seed(6)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in soul]
        for a, b, g in zip(soul, plain, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt_soul.update_hessian()
        opt_plain.update_hessian()
        opt_soul.step(bs=5120)
        opt_plain.step(bs=5120)
    for a, b in zip(soul, plain):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-12)
    assert not math.isnan(opt_soul.clip_rate)


def test_chunked_update_equals_whole_tensor_update(monkeypatch):
    """Large tensors (a ZeRO flat partition) are updated CHUNK elements at a time: the same values,
    the same clip_rate."""
    import ray_unlearn.optim.sophia as sophia

    def run(chunk: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        monkeypatch.setattr(sophia, "CHUNK", chunk)
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(50))
        opt = SophiaG([p], lr=0.1, rho=0.05)
        for _ in range(3):
            p.grad = torch.randn(50)
            opt.update_hessian()
            opt.step(bs=4)
        return p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.clip_rate

    whole, chunked = run(1 << 22), run(7)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1]) and whole[2] == chunked[2]


def test_fold_grad_squares_folds_h_only():
    """h <- b2*h + (1-b2)*g*g by hand; the momentum untouched even with soul_compat; no grad: h decays."""
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    opt = SophiaG([p, q], betas=(0.9, 0.5), soul_compat=True)
    p.grad = torch.tensor([2.0, -3.0])
    opt.fold_grad_squares()
    assert opt.state[p]["hessian"].tolist() == [2.0, 4.5] and opt.state[p]["exp_avg"].tolist() == [0.0, 0.0]
    q.grad = None
    opt.state[q]["hessian"].fill_(1.0)
    opt.fold_grad_squares()
    assert opt.state[q]["hessian"].tolist() == [0.5] and opt.state[p]["hessian"].tolist() == [3.0, 6.75]
