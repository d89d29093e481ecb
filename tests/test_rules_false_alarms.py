"""False alarms on healthy, real programs (issue #11), and the true positives next to them.

* ``input-not-normalized`` on an LSTM's own state fed back in (word-language-model
  style ``output, hidden = model(x, hidden)``): the state is the model's, not data.
* ``param-not-updating`` on the official MNIST example's ``fc1`` (1.2M weights) under
  Adadelta: the update norm is measured on a sample, and when the gradient is sparse
  (dead channels: blank stand-in images) the sample can sit on elements that have no
  gradient while the rest of the layer moves.
* ``disconnected-param`` on branches a model uses in some steps only: a mixture of
  experts routed per batch, stochastic depth.

Each healthy program runs through ``watch()`` around an ordinary loop and, where the
program fits one, through the Runner, on several seeds.
"""

from __future__ import annotations

import pytest
import torch
from helpers import one_thread  # noqa: F401  (fixture)
from test_rules_support import classification, find, loader, problems
from torch import nn
from torch.nn import functional as F

import tlwidgets as tlw

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEEDS = (0, 1, 2)


def _clean(session) -> None:
    assert session.diagnostic_errors == []


# ====================================================================== input-not-normalized
class WordLM(nn.Module):
    """pytorch/examples word_language_model's RNNModel (LSTM), smaller.

    The forget-gate biases start high (a common init for long memories), so the cell
    state carried from batch to batch grows to a std above 10, as it does in large
    trained LSTMs.
    """

    def __init__(self, ntoken: int, nhid: int = 128, nlayers: int = 2, forget_bias: float = 3.5) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, nhid)
        self.rnn = nn.LSTM(nhid, nhid, nlayers, dropout=0.2)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers
        with torch.no_grad():
            for name, p in self.rnn.named_parameters():
                if name.startswith("bias_hh"):
                    p[nhid : 2 * nhid] = forget_bias

    def forward(self, tokens: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        emb = self.drop(self.encoder(tokens))
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(self.drop(output)).view(-1, self.decoder.out_features)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = next(self.parameters())
        return (w.new_zeros(self.nlayers, bsz, self.nhid), w.new_zeros(self.nlayers, bsz, self.nhid))


def _corpus(seed: int, tokens: int, vocab: int = 100) -> torch.Tensor:
    """Text from a sparse Markov chain (each token has 3 likely successors)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 3), generator=g)
    choice = torch.randint(0, 3, (tokens,), generator=g).tolist()
    out, t = [], 0
    for c in choice:
        out.append(t)
        t = int(succ[t, c])
    return torch.tensor(out)


def _train_word_lm(seed: int, steps: int = 40, bsz: int = 16, bptt: int = 30):
    torch.manual_seed(seed)
    vocab = 100
    data = _corpus(seed, bsz * (bptt * steps + 1), vocab).view(bsz, -1).t().contiguous()  # batchify
    model = WordLM(vocab)
    crit = nn.NLLLoss()
    opt = torch.optim.SGD(model.parameters(), lr=20.0)
    widest = 0.0  # largest std of the cell state fed back in
    with tlw.watch(model, opt, loss_fn=crit) as w:
        model.train()
        hidden = model.init_hidden(bsz)
        for i in range(steps):
            x = data[i * bptt : (i + 1) * bptt]
            y = data[i * bptt + 1 : (i + 1) * bptt + 1].reshape(-1)
            hidden = tuple(h.detach() for h in hidden)  # repackage_hidden
            widest = max(widest, float(hidden[1].std()))
            opt.zero_grad()
            output, hidden = model(x, hidden)
            loss = crit(output, y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
    return w, widest


@pytest.mark.parametrize("seed", SEEDS)
def test_lstm_state_fed_back_is_not_an_unnormalized_input(seed: int) -> None:
    w, widest = _train_word_lm(seed)
    assert widest > 10  # the state fed back was far from unit scale
    assert find(w, "input-not-normalized") == []
    _clean(w)


class SensorLSTM(nn.Module):
    """A sequence regressor called as ``model(features, state)`` with its state carried over."""

    def __init__(self, features: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        out, state = self.rnn(x, state)
        return self.head(out[:, -1]), state


@pytest.mark.parametrize("seed", SEEDS)
def test_raw_features_next_to_a_fed_back_state_are_still_reported(seed: int) -> None:
    torch.manual_seed(seed)
    model = SensorLSTM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.MSELoss()
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(16 * 6, 20, 8, generator=g) * 255  # raw 0-255 readings
    target = raw.mean((1, 2)).unsqueeze(1) / 255
    with tlw.watch(model, opt, loss_fn=crit) as w:
        state = (torch.zeros(1, 16, 32), torch.zeros(1, 16, 32))
        for i in range(6):
            state = tuple(s.detach() for s in state)
            opt.zero_grad()
            pred, state = model(raw[i * 16 : (i + 1) * 16], state)
            crit(pred, target[i * 16 : (i + 1) * 16]).backward()
            opt.step()
    (f,) = find(w, "input-not-normalized")
    assert f.params == ("inputs[0]",) and f.first_step == 0
    _clean(w)


def test_raw_pixel_rows_into_an_lstm_are_reported_by_the_runner() -> None:
    class RowLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.rnn = nn.LSTM(28, 28, batch_first=True)  # hidden size == row length: shapes alike
            self.head = nn.Linear(28, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (64, 28, 28), generator=g).float()
    labels = torch.randint(0, 10, (64,), generator=g)
    model = RowLSTM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    r = tlw.Runner(model, nn.CrossEntropyLoss(), opt, loader(pixels, labels, batch_size=16))
    r.run(steps=2)
    (f,) = find(r, "input-not-normalized")
    assert f.params == ("inputs",) and f.evidence["max"] > 100


# ====================================================================== param-not-updating
class MnistNet(nn.Module):
    """pytorch/examples mnist/main.py's Net."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def _mnist_stand_in(seed: int, kind: str, n: int = 64 * 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in for MNIST after ToTensor + Normalize((0.1307,), (0.3081,)): random or blank images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 28, 28, generator=g) if kind == "random" else torch.zeros(n, 1, 28, 28)
    return (images - 0.1307) / 0.3081, torch.randint(0, 10, (n,), generator=g)


def _make_opt(name: str, params) -> torch.optim.Optimizer:
    return {
        "Adadelta": lambda: torch.optim.Adadelta(params, lr=1.0),
        "Adagrad": lambda: torch.optim.Adagrad(params, lr=0.01),
        "Adam": lambda: torch.optim.Adam(params, lr=1e-3),
        "RMSprop": lambda: torch.optim.RMSprop(params, lr=1e-3),
    }[name]()


def _mnist_watch(seed: int, kind: str, opt_name: str = "Adadelta", steps: int = 10, hook_loss: bool = True):
    """The example's train() under watch(); ``hook_loss=False``: ``watch(model, optimizer)`` only."""
    torch.manual_seed(seed)
    model = MnistNet()
    opt = _make_opt(opt_name, model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    x, y = _mnist_stand_in(seed, kind)
    crit = nn.NLLLoss() if hook_loss else F.nll_loss
    before = model.fc1.weight.detach().clone()
    with tlw.watch(model, opt, loss_fn=crit if hook_loss else None) as w:
        model.train()
        for i in range(steps):
            data, target = x[(i * 64) % len(x) :][:64], y[(i * 64) % len(y) :][:64]
            opt.zero_grad()
            loss = crit(model(data), target)
            loss.backward()
            opt.step()
        scheduler.step()  # once per epoch, as the example does
    return w, bool((model.fc1.weight.detach() != before).any())


@pytest.mark.parametrize(
    "kind, seed", [("blank", 0), ("blank", 1), ("blank", 2), ("random", 0)]
)  # blank stand-in images kill whole channels: fc1's gradient is sparse
def test_adadelta_mnist_example_under_watch_is_not_flagged(kind: str, seed: int) -> None:
    w, fc1_moved = _mnist_watch(seed, kind, hook_loss=seed != 2)  # seed 2: watch(model, optimizer) only
    assert fc1_moved
    assert find(w, "param-not-updating") == []
    _clean(w)


@pytest.mark.parametrize("opt_name", ["Adagrad", "Adam", "RMSprop"])
def test_adaptive_optimizers_with_sparse_gradients_are_not_flagged(opt_name: str) -> None:
    w, fc1_moved = _mnist_watch(0, "blank", opt_name, steps=8)
    assert fc1_moved
    assert find(w, "param-not-updating") == []
    _clean(w)


@pytest.mark.parametrize("seed", SEEDS)
def test_adadelta_mnist_example_in_the_runner_is_not_flagged(seed: int) -> None:
    torch.manual_seed(seed)
    model = MnistNet()
    opt = torch.optim.Adadelta(model.parameters(), lr=1.0)
    x, y = _mnist_stand_in(seed, "blank")
    r = tlw.Runner(
        model,
        F.nll_loss,
        opt,
        loader(x, y, batch_size=64, seed=seed),
        scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7),
    )
    before = model.fc1.weight.detach().clone()
    r.run(steps=10)
    assert bool((model.fc1.weight.detach() != before).any())
    assert find(r, "param-not-updating") == []
    _clean(r)


class _SkipsLastGroup(torch.optim.Optimizer):
    """A hand-written SGD with a bug: its loop over the groups stops before the last one."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups[:-1]:  # the bug: should be self.param_groups
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def _two_groups(model: nn.Module, lr_head: float) -> list[dict]:
    head = {id(p) for p in model[-1].parameters()}
    return [
        {"params": [p for p in model.parameters() if id(p) not in head]},
        {"params": list(model[-1].parameters()), "lr": lr_head},
    ]


def _watch_mlp(opt_factory, steps: int = 8):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = opt_factory(model)
    crit = nn.CrossEntropyLoss()
    x, y = classification(n=256)
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for i, (xb, yb) in enumerate(loader(x, y)):
            if i == steps:
                break
            opt.zero_grad()
            crit(model(xb), yb).backward()
            opt.step()
    return w


@pytest.mark.parametrize("opt_cls", [torch.optim.Adadelta, torch.optim.Adam, torch.optim.RMSprop])
def test_group_with_lr_zero_under_an_adaptive_optimizer_is_reported_under_watch(opt_cls) -> None:
    w = _watch_mlp(lambda m: opt_cls(_two_groups(m, 0.0), lr=1e-2))
    (f,) = find(w, "param-not-updating")
    assert f.params == ("2.weight", "2.bias") and f.first_step <= 1 and f.evidence["zero_lr_groups"] == [1]


def test_optimizer_that_skips_a_group_is_reported_under_watch() -> None:
    w = _watch_mlp(lambda m: _SkipsLastGroup(_two_groups(m, 0.1), lr=0.1))
    (f,) = find(w, "param-not-updating")
    assert f.params == ("2.weight", "2.bias") and f.first_step <= 5


def test_optimizer_that_skips_a_group_is_reported_by_the_runner() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    x, y = classification(n=256)
    r = tlw.Runner(
        model, nn.CrossEntropyLoss(), _SkipsLastGroup(_two_groups(model, 0.1), lr=0.1), loader(x, y)
    )
    r.run(steps=8)
    (f,) = find(r, "param-not-updating")
    assert f.params == ("2.weight", "2.bias") and f.first_step <= 5


# ====================================================================== disconnected-param
class MoE(nn.Module):
    """A mixture of experts that routes each batch to one expert (top-1 over the batch's mean gate).

    ``routing="learned"``: the expert with the largest mean gate probability;
    ``"sampled"``: one expert drawn from the mean gate probabilities (exploration).
    """

    def __init__(
        self, d: int = 20, h: int = 32, c: int = 4, experts: int = 4, routing: str = "learned"
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, c)) for _ in range(experts)
        )
        self.routing = routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1).mean(0)
        if self.routing == "learned":
            e = int(probs.argmax())
        else:
            e = int(torch.multinomial(probs.detach(), 1))
        return probs[e] * self.experts[e](x)


class StochasticDepth(nn.Module):
    """Residual blocks skipped with probability ``p`` in training (Huang et al. 2016)."""

    def __init__(self, d: int = 20, h: int = 32, c: int = 4, blocks: int = 4, p: float = 0.3) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h)) for _ in range(blocks)
        )
        self.out = nn.Linear(h, c)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            if self.training:
                if torch.rand(()) < self.p:
                    continue
                x = x + block(x) / (1 - self.p)
            else:
                x = x + block(x)
        return self.out(x)


class WithUnusedHead(StochasticDepth):
    """Stochastic depth plus a head that forward() never calls (a real bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(32, 4)


def _build(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return {
        "moe-learned": lambda: MoE(routing="learned"),
        "moe-sampled": lambda: MoE(routing="sampled"),
        "moe-2-sampled": lambda: MoE(routing="sampled", experts=2),
        "stochastic-depth": StochasticDepth,
        "unused-head": WithUnusedHead,
    }[kind]()


def _run_runner(model: nn.Module, seed: int, steps: int) -> tlw.Runner:
    x, y = classification(n=1024, seed=seed)
    r = tlw.Runner(
        model, nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.05), loader(x, y, seed=seed)
    )
    r.run(steps=steps)
    return r


def _run_watch(model: nn.Module, seed: int, steps: int, set_to_none: bool = True):
    x, y = classification(n=1024, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    n = 0
    with tlw.watch(model, opt, loss_fn=crit) as w:
        while n < steps:
            for xb, yb in loader(x, y, seed=seed + n):
                model.train()
                opt.zero_grad(set_to_none=set_to_none)
                crit(model(xb), yb).backward()
                opt.step()
                n += 1
                if n == steps:
                    break
    return w


_BRANCHY = ["moe-learned", "moe-sampled", "moe-2-sampled", "stochastic-depth"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", _BRANCHY)
def test_branches_used_in_some_steps_are_connected_in_the_runner(kind: str, seed: int) -> None:
    r = _run_runner(_build(kind, seed), seed, steps=300)
    assert find(r, "disconnected-param") == []
    _clean(r)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", _BRANCHY)
def test_branches_used_in_some_steps_are_connected_under_watch(kind: str, seed: int) -> None:
    w = _run_watch(_build(kind, seed), seed, steps=300)
    assert find(w, "disconnected-param") == []
    _clean(w)


@pytest.mark.parametrize("kind", ["moe-sampled", "stochastic-depth"])
def test_branches_used_in_some_steps_are_connected_when_grads_are_zeroed_in_place(kind: str) -> None:
    w = _run_watch(_build(kind, 0), 0, steps=300, set_to_none=False)
    assert find(w, "disconnected-param") == []
    _clean(w)


@pytest.mark.parametrize("seed", SEEDS)
def test_head_never_called_is_found_soon_beside_stochastic_depth(seed: int) -> None:
    for session in (
        _run_runner(_build("unused-head", seed), seed, 30),
        _run_watch(_build("unused-head", seed), seed, 30),
    ):
        (f,) = find(session, "disconnected-param")
        assert f.params == ("aux.weight", "aux.bias") and f.first_step <= 25


class _DetachedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(20, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).detach())


@pytest.mark.parametrize("set_to_none", [True, False])
def test_output_computed_from_detach_is_found_under_watch(set_to_none: bool) -> None:
    w = _run_watch(_DetachedHead(), 0, steps=60 if set_to_none else 400, set_to_none=set_to_none)
    (f,) = find(w, "disconnected-param")
    assert f.params == ("body.0.weight", "body.0.bias")
    assert f.first_step <= (20 if set_to_none else 400)


def test_output_computed_from_detach_is_found_soon_by_the_runner() -> None:
    r = _run_runner(_DetachedHead(), 0, steps=30)
    (f,) = find(r, "disconnected-param")
    assert f.params == ("body.0.weight", "body.0.bias") and f.first_step <= 20
    assert problems(r) == [f]


# ====================================================================== transformers (HF Trainer report)
# A tiny BERT built from its config (nothing downloaded) on a generated token task, trained the way
# the Hugging Face Trainer does it, under watch(): AdamW with two groups (weight matrices; biases and
# LayerNorm without weight decay), a linear decay of the LR to 0, clip_grad_norm_(1.0).
def _token_task(n: int, seed: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 1 when the sequence holds token 3 (at a random position), else 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(5, 100, (n, length), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(0, length, (n,), generator=g)
    x[y == 1, pos[y == 1]] = 3
    return x, y


def _train_bert(seed: int, lr: float, epochs: int, length: int = 16, layers: int = 2, bs: int = 32):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        num_hidden_layers=layers,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(cfg)
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    n = 1024
    x, y = _token_task(n, seed, length)
    steps = epochs * (n // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, bs):
                idx = perm[i : i + bs]
                logits = model(input_ids=x[idx], attention_mask=torch.ones_like(x[idx])).logits
                opt.zero_grad()
                crit(logits, y[idx]).backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
    return w


def _loss_fell(w, to: float) -> bool:
    loss = w.history.loss
    return float(loss[-10:].mean()) < to * float(loss[:5].mean())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seed, layers", [(0, 2), (1, 4)])
def test_healthy_tiny_bert_has_no_vanishing_gradients(seed: int, layers: int) -> None:
    # Layer 0's attention query gets ~1e-4 of the classifier's gradient/weight at initialization (the
    # softmax over scores is nearly uniform); the blocks' medians (value, dense matrices) are flat.
    w = _train_bert(seed, lr=1e-3, epochs=3, layers=layers)
    assert _loss_fell(w, 0.7)
    assert problems(w) == [], [str(f) for f in problems(w)]
    _clean(w)


@pytest.mark.usefixtures("one_thread")
def test_converged_tiny_bert_has_no_lr_too_low() -> None:
    # At a loss of ~0.004 (from 0.69) the no-decay group (LayerNorm gains) moves ~1e-6 of its norm a
    # step at 15% of the peak LR: its gradients are near Adam's eps. Converged, not a too-low LR.
    w = _train_bert(0, lr=3e-3, epochs=4, length=8)
    assert _loss_fell(w, 0.01)
    assert problems(w) == [], [str(f) for f in problems(w)]
    _clean(w)


def _fit_exactly(seed: int, opt_name: str, steps: int = 400):
    """A noise-free linear regression: the loss falls to float precision and the steps with it."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.5
    model = nn.Sequential(nn.Linear(8, 1))
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
    crit = nn.MSELoss()
    with tlw.watch(model, opt, loss_fn=crit) as w:
        done = 0
        while done < steps:
            for xb, yb in loader(x, y, batch_size=64, seed=seed + done):
                opt.zero_grad()
                crit(model(xb), yb).backward()
                opt.step()
                done += 1
                if done == steps:
                    break
    return w


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("seed", SEEDS)
def test_regression_fit_to_float_precision_is_not_lr_too_low(seed: int, opt_name: str) -> None:
    w = _fit_exactly(seed, opt_name)
    assert _loss_fell(w, 1e-6)
    assert find(w, "lr-too-low") == [] and problems(w) == [], [str(f) for f in problems(w)]
    _clean(w)


class _SigmoidBlocks(nn.Module):
    """A deep stack of 2-layer sigmoid blocks (``blocks.3.0.weight``): gradients vanish block by block."""

    def __init__(self, depth: int = 6, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Linear(20, width)
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(nn.Linear(width, width), nn.Sigmoid(), nn.Linear(width, width), nn.Sigmoid())
                for _ in range(depth)
            ]
        )
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(torch.sigmoid(self.stem(x))))


def test_gradients_vanishing_block_by_block_are_still_reported() -> None:
    torch.manual_seed(0)
    model = _SigmoidBlocks()
    w = _run_watch(model, 0, steps=30)
    (f,) = find(w, "vanishing-gradients")
    assert f.params == ("stem.weight",) and f.evidence["ratio"] < 1e-4
    assert "blocks.0" in f.evidence["profile"] and f.evidence["output_layer"] == "head"


def _clipped_digits(lr: float, max_norm: float, seed: int = 0):
    """The digits MLP under AdamW with clip_grad_norm_ (the Hugging Face Trainer's default is 1.0)."""
    from tlwidgets.zoo.datasets import digits_datasets

    torch.manual_seed(seed)
    x, y = digits_datasets(seed)[0].tensors
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    crit = nn.CrossEntropyLoss()
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for _ in range(2):
            for xb, yb in loader(x, y, batch_size=32, seed=seed):
                opt.zero_grad()
                crit(model(xb), yb).backward()
                nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                opt.step()
    return w


@pytest.mark.parametrize("seed", SEEDS)
def test_clipping_that_an_lr_far_too_high_forces_comes_after_the_lr(seed: int) -> None:
    # At lr 1.0 the loss reaches ~1e3 and a clip at 1.0 cuts the gradients ~100-fold on every step:
    # the clip is a consequence ("raise max_norm" would be the wrong advice), the LR the cause.
    w = _clipped_digits(1.0, 1.0, seed)
    got = [f.code for f in problems(w)]
    assert got[0] == "lr-too-high", got
    (clip,) = find(w, "grad-clipping-too-strong")
    assert "lr-too-high" in clip.likely_causes


def test_clipping_too_strong_at_a_healthy_lr_is_still_first() -> None:
    w = _clipped_digits(1e-3, 1e-4)
    got = [f.code for f in problems(w)]
    assert got and got[0] == "grad-clipping-too-strong" and "lr-too-high" not in got, got


def test_an_lr_cut_on_a_converged_run_is_not_too_low():
    """A run at 0.1% of its starting loss whose LR is then cut 50x is done, not held back: lr-too-low
    said "the loss barely moved (1.237 -> 1.8e-05)" (seen in a browser check; fails on the old rule)."""
    torch.manual_seed(0)
    x = torch.randn(64, 10)
    y = x[:, :3].argmax(1)  # learnable labels: the run converges
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    runner = tlw.Runner(model, torch.nn.CrossEntropyLoss(), opt, data)
    runner.run(steps=800)
    assert runner.history.loss[-10:].mean() < 1e-2 * runner.history.loss[0]  # converged
    runner.set_lr(0.001)
    runner.run(steps=600)
    assert "lr-too-low" not in [f.code for f in runner.findings]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_loss_bump_during_a_one_cycle_warm_up_is_not_lr_too_high(seed: int) -> None:
    # OneCycleLR raising SGD's LR to 0.2 with batch norm, dropout and label smoothing: the loss rises
    # for a few steps while the LR climbs, well below where it started, and the run reaches ~95%.
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    steps_per_epoch = 1400 // 32
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=5 * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    with tlw.watch(model, opt, loss_fn=crit) as w:
        for _ in range(5):
            perm = torch.randperm(1400, generator=gen)
            for i in range(steps_per_epoch):
                idx = perm[i * 32 : (i + 1) * 32]
                opt.zero_grad()
                crit(model(x[idx]), y[idx]).backward()
                opt.step()
                sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[1400:]).argmax(1) == y[1400:]).float().mean()
    assert accuracy > 0.9
    assert problems(w) == [], [f.message for f in problems(w)]
