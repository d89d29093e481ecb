"""Healthy real-world programs stay silent: the official PyTorch examples under ``watch()`` (#11).

Compact re-creations of the training loops of github.com/pytorch/examples as their authors
wrote them (their model classes scaled down; their optimizer, scheduler and loss choices;
their loop structure: where ``zero_grad`` sits, ``clip_grad_norm_``, ``torch.save`` inside
the loop, validation under ``no_grad``, ``train()``/``eval()``), run on generated stand-in
data (no downloads, a fixed ``torch.Generator``), with ``tlw.watch(model, optimizer, ...)``
wrapped around the unchanged loop. Each must finish with no warning or error, no internal
tracking failure, and one history row per optimizer step.

Where an example calls a plain loss function (``F.nll_loss``, a VAE's own loss), the
watcher gets no ``loss_fn`` (as a user would write it); where it uses an ``nn.Module``
criterion, the criterion is passed as ``loss_fn``.
"""

from __future__ import annotations

import io
import math
from collections import deque, namedtuple

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Categorical
from torch.nn import functional as F

import tlwidgets as tlw

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

torch.set_num_threads(1)

SEEDS = (0, 1)


# ============================================================================ shared helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_healthy(w: tlw.Watcher, steps: int) -> None:
    """No warning or error, no tracking failure, one history row per optimizer step."""
    loud = [f for f in w.findings if f.severity in ("warning", "error")]
    report = "\n".join(
        f"  {f.severity} {f.code} step={f.step} params={tuple(f.params)[:6]}: {f.message}" for f in loud
    )
    assert loud == [], f"false alarms on a healthy program:\n{report}"
    assert w.diagnostic_errors == []
    assert len(w.history) == steps


def _save(obj) -> None:
    """``torch.save`` to memory (the examples save to a file)."""
    torch.save(obj, io.BytesIO())


def _digits(seed: int, n: int, size: int = 16, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-like stand-in: ``(n, 1, size, size)`` images in [0, 1] (dark background, a bright
    class-dependent stroke pattern, jitter and noise) and their labels."""
    g = _gen(seed)
    templates = (torch.rand(classes, 1, size, size, generator=g) > 0.8).float()
    templates = F.avg_pool2d(F.pad(templates, (1, 1, 1, 1)), 3, stride=1) * 2.5
    y = torch.randint(0, classes, (n,), generator=g)
    shift = torch.randint(-1, 2, (n, 2), generator=g)
    x = torch.stack([torch.roll(templates[c], tuple(s.tolist()), dims=(1, 2)) for c, s in zip(y, shift)])
    x = x * (0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)) + 0.1 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1), y


def _mnist_normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.1307) / 0.3081  # transforms.Normalize((0.1307,), (0.3081,))


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, g: torch.Generator):
    """One shuffled epoch, as a DataLoader(shuffle=True) gives it."""
    perm = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        yield x[idx], y[idx]


# ============================================================================ mnist
class MnistNet(nn.Module):
    """mnist/main.py's Net, on 16x16 images (fc1 is 9216 -> 128 on 28x28)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64 * 6 * 6, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


@pytest.mark.parametrize("seed", SEEDS)
def test_mnist(seed: int) -> None:
    torch.manual_seed(seed)
    x, y = _digits(seed, 640 + 128)
    x = _mnist_normalize(x)
    train_x, train_y, test_x, test_y = x[:640], y[:640], x[640:], y[640:]
    g = _gen(seed + 100)
    model = MnistNet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    steps = 0
    with tlw.watch(model, optimizer) as w:
        for _epoch in range(3):
            # train()
            model.train()
            for data, target in _batches(train_x, train_y, 32, g):
                optimizer.zero_grad()
                output = model(data)
                loss = F.nll_loss(output, target)
                loss.backward()
                optimizer.step()
                steps += 1
            # test()
            model.eval()
            test_loss, correct = 0.0, 0
            with torch.no_grad():
                for data, target in _batches(test_x, test_y, 64, g):
                    output = model(data)
                    test_loss += F.nll_loss(output, target, reduction="sum").item()
                    correct += (
                        output.argmax(dim=1, keepdim=True).eq(target.view_as(output.argmax(1, True))).sum()
                    )
            scheduler.step()
        _save(model.state_dict())
    _assert_healthy(w, steps)


# ============================================================================ word_language_model
class RNNModel(nn.Module):
    """word_language_model/model.py's RNNModel (LSTM), smaller."""

    def __init__(
        self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.5, tie: bool = False
    ):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie:
            self.decoder.weight = self.encoder.weight
        self.init_weights()
        self.nhid, self.nlayers = nhid, nlayers

    def init_weights(self) -> None:
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input: torch.Tensor, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        return (
            weight.new_zeros(self.nlayers, bsz, self.nhid),
            weight.new_zeros(self.nlayers, bsz, self.nhid),
        )


def _corpus(seed: int, tokens: int, vocab: int) -> torch.Tensor:
    """Text from a sparse Markov chain (each token has 3 likely successors)."""
    g = _gen(seed)
    succ = torch.randint(0, vocab, (vocab, 3), generator=g)
    choice = torch.randint(0, 3, (tokens,), generator=g).tolist()
    out, t = [], 0
    for c in choice:
        out.append(t)
        t = int(succ[t, c])
    return torch.tensor(out)


def _batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    return data.view(bsz, -1).t().contiguous()


def repackage_hidden(h):
    """Wraps hidden states in new Tensors, to detach them from their history."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


@pytest.mark.parametrize("seed, tied", [(0, False), (1, True)])
def test_word_language_model(seed: int, tied: bool) -> None:
    torch.manual_seed(seed)
    ntokens, bptt, bsz, eval_bsz, clip = 60, 20, 10, 5, 0.25
    corpus = _corpus(seed, 6000, ntokens)
    train_data, val_data = _batchify(corpus[:4400], bsz), _batchify(corpus[4400:], eval_bsz)
    model = RNNModel(ntokens, 32, 32, 2, dropout=0.2, tie=tied)
    criterion = nn.NLLLoss()
    lr = 20.0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def get_batch(source: torch.Tensor, i: int):
        seq_len = min(bptt, len(source) - 1 - i)
        return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].view(-1)

    def evaluate(data_source: torch.Tensor) -> float:
        model.eval()
        total_loss = 0.0
        hidden = model.init_hidden(eval_bsz)
        with torch.no_grad():
            for i in range(0, data_source.size(0) - 1, bptt):
                data, targets = get_batch(data_source, i)
                output, hidden = model(data, hidden)
                hidden = repackage_hidden(hidden)
                total_loss += len(data) * criterion(output, targets).item()
        return total_loss / (len(data_source) - 1)

    steps = 0
    best_val_loss = None
    with tlw.watch(model, optimizer, loss_fn=criterion) as w:
        for _epoch in range(3):
            # train()
            model.train()
            hidden = model.init_hidden(bsz)
            for i in range(0, train_data.size(0) - 1, bptt):
                data, targets = get_batch(train_data, i)
                model.zero_grad()
                hidden = repackage_hidden(hidden)
                output, hidden = model(data, hidden)
                loss = criterion(output, targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()  # the example: p.data.add_(p.grad, alpha=-lr) for each parameter
                steps += 1
            val_loss = evaluate(val_data)
            if not best_val_loss or val_loss < best_val_loss:
                _save(model)  # with open(args.save, 'wb') as f: torch.save(model, f)
                best_val_loss = val_loss
            else:
                lr /= 4.0  # anneal the learning rate when no progress on the validation set
                for group in optimizer.param_groups:
                    group["lr"] = lr
    assert steps >= 40
    _assert_healthy(w, steps)


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, dropout: float = 0.1, max_len: int = 5000) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0).transpose(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pe[: x.size(0), :]
        return self.dropout(x)


class TransformerModel(nn.Transformer):
    """word_language_model/model.py's TransformerModel (an nn.Transformer whose encoder alone is
    used, with a causal mask built and cached in forward)."""

    def __init__(self, ntoken: int, ninp: int, nhead: int, nhid: int, nlayers: int, dropout: float = 0.5):
        super().__init__(
            d_model=ninp, nhead=nhead, dim_feedforward=nhid, num_encoder_layers=nlayers, dropout=dropout
        )
        self.model_type = "Transformer"
        self.src_mask = None
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        self.input_emb = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)
        initrange = 0.1
        nn.init.uniform_(self.input_emb.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def _generate_square_subsequent_mask(self, sz: int) -> torch.Tensor:
        return torch.log(torch.tril(torch.ones(sz, sz)))

    def forward(self, src: torch.Tensor, has_mask: bool = True) -> torch.Tensor:
        if has_mask:
            device = src.device
            if self.src_mask is None or self.src_mask.size(0) != len(src):
                self.src_mask = self._generate_square_subsequent_mask(len(src)).to(device)
        else:
            self.src_mask = None
        src = self.input_emb(src) * math.sqrt(self.ninp)
        src = self.pos_encoder(src)
        output = self.encoder(src, mask=self.src_mask)
        output = self.decoder(output)
        return F.log_softmax(output, dim=-1)


@pytest.mark.parametrize("seed", SEEDS)
def test_word_language_model_transformer(seed: int) -> None:
    torch.manual_seed(seed)
    ntokens, bptt, bsz, eval_bsz, clip = 60, 20, 10, 5, 0.25
    corpus = _corpus(seed, 6000, ntokens)
    train_data, val_data = _batchify(corpus[:4400], bsz), _batchify(corpus[4400:], eval_bsz)
    model = TransformerModel(ntokens, 32, 2, 64, 2, dropout=0.2)
    criterion = nn.NLLLoss()
    lr = 5.0  # README: python main.py --model Transformer --lr 5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def get_batch(source: torch.Tensor, i: int):
        seq_len = min(bptt, len(source) - 1 - i)
        return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].view(-1)

    def evaluate(data_source: torch.Tensor) -> float:
        model.eval()
        total_loss = 0.0
        with torch.no_grad():
            for i in range(0, data_source.size(0) - 1, bptt):
                data, targets = get_batch(data_source, i)
                output = model(data)
                output = output.view(-1, ntokens)
                total_loss += len(data) * criterion(output, targets).item()
        return total_loss / (len(data_source) - 1)

    steps = 0
    best_val_loss = None
    with tlw.watch(model, optimizer, loss_fn=criterion) as w:
        for _epoch in range(2):
            model.train()
            for i in range(0, train_data.size(0) - 1, bptt):
                data, targets = get_batch(train_data, i)
                model.zero_grad()
                output = model(data)
                output = output.view(-1, ntokens)
                loss = criterion(output, targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                steps += 1
            val_loss = evaluate(val_data)
            if not best_val_loss or val_loss < best_val_loss:
                _save(model)
                best_val_loss = val_loss
            else:
                lr /= 4.0
                for group in optimizer.param_groups:
                    group["lr"] = lr
    assert steps >= 40
    _assert_healthy(w, steps)


# ============================================================================ dcgan
class Generator(nn.Module):
    def __init__(self, nz: int, ngf: int, nc: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.main(input)


class Discriminator(nn.Module):
    def __init__(self, ndf: int, nc: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self.main(input)
        return output.view(-1, 1).squeeze(1)


def weights_init(m: nn.Module) -> None:
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        torch.nn.init.normal_(m.weight, 1.0, 0.02)
        torch.nn.init.zeros_(m.bias)


def _dcgan(seed: int, watched: str) -> None:
    torch.manual_seed(seed)
    nz, ngf, ndf, nc, batch_size = 16, 8, 8, 1, 32
    x, y = _digits(seed, 32 * 20)
    real_images = (x - 0.5) / 0.5  # Normalize((0.5,), (0.5,)): [-1, 1] like the generator's tanh
    g = _gen(seed + 100)
    netG = Generator(nz, ngf, nc)
    netG.apply(weights_init)
    netD = Discriminator(ndf, nc)
    netD.apply(weights_init)
    criterion = nn.BCELoss()
    fixed_noise = torch.randn(batch_size, nz, 1, 1)
    real_label, fake_label = 1, 0
    optimizerD = torch.optim.Adam(netD.parameters(), lr=0.0002, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=0.0002, betas=(0.5, 0.999))
    model, optimizer = (netD, optimizerD) if watched == "D" else (netG, optimizerG)
    steps = 0
    with tlw.watch(model, optimizer, loss_fn=criterion) as w:
        for _epoch in range(2):
            for i, data in enumerate(_batches(real_images, y, batch_size, g)):
                # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
                netD.zero_grad()
                real_cpu = data[0]
                batch_size = real_cpu.size(0)
                label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype)
                output = netD(real_cpu)
                errD_real = criterion(output, label)
                errD_real.backward()
                D_x = output.mean().item()
                noise = torch.randn(batch_size, nz, 1, 1)
                fake = netG(noise)
                label.fill_(fake_label)
                output = netD(fake.detach())
                errD_fake = criterion(output, label)
                errD_fake.backward()
                D_G_z1 = output.mean().item()
                errD = errD_real + errD_fake
                optimizerD.step()
                # (2) Update G network: maximize log(D(G(z)))
                netG.zero_grad()
                label.fill_(real_label)  # fake labels are real for generator cost
                output = netD(fake)
                errG = criterion(output, label)
                errG.backward()
                D_G_z2 = output.mean().item()
                optimizerG.step()
                steps += 1
                assert math.isfinite(errD.item() + errG.item() + D_x + D_G_z1 + D_G_z2)
                if i % 10 == 0:
                    with torch.no_grad():
                        netG(fixed_noise)  # vutils.save_image(fake.detach(), ...)
            # do checkpointing
            _save(netG.state_dict())
            _save(netD.state_dict())
    _assert_healthy(w, steps)


@pytest.mark.parametrize("seed", SEEDS)
def test_dcgan_discriminator(seed: int) -> None:
    _dcgan(seed, "D")


@pytest.mark.parametrize("seed", SEEDS)
def test_dcgan_generator(seed: int) -> None:
    _dcgan(seed, "G")


# ============================================================================ time_sequence_prediction
class Sequence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm1 = nn.LSTMCell(1, 51)
        self.lstm2 = nn.LSTMCell(51, 51)
        self.linear = nn.Linear(51, 1)

    def forward(self, input: torch.Tensor, future: int = 0) -> torch.Tensor:
        outputs = []
        h_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t = torch.zeros(input.size(0), 51, dtype=torch.double)
        h_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        c_t2 = torch.zeros(input.size(0), 51, dtype=torch.double)
        for input_t in input.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        for _ in range(future):  # if we should predict the future
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs += [output]
        return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("seed", SEEDS)
def test_time_sequence_prediction(seed: int) -> None:
    # generate_sine_wave.py: T = 20, L = 1000, N = 100 (here L = 22, N = 20; 15 steps there)
    rs = np.random.RandomState(seed)
    T, L, N = 20, 22, 20
    x = np.empty((N, L), "int64")
    x[:] = np.array(range(L)) + rs.randint(-4 * T, 4 * T, N).reshape(N, 1)
    data = np.sin(x / 1.0 / T).astype("float64")
    torch.manual_seed(seed)
    input = torch.from_numpy(data[3:, :-1])
    target = torch.from_numpy(data[3:, 1:])
    test_input = torch.from_numpy(data[:3, :-1])
    test_target = torch.from_numpy(data[:3, 1:])
    seq = Sequence()
    seq.double()
    criterion = nn.MSELoss()
    optimizer = torch.optim.LBFGS(seq.parameters(), lr=0.8)
    steps = 6  # each up to 20 evaluations of the closure (LBFGS's max_iter)
    with tlw.watch(seq, optimizer, loss_fn=criterion) as w:
        for _i in range(steps):

            def closure():
                optimizer.zero_grad()
                out = seq(input)
                loss = criterion(out, target)
                loss.backward()
                return loss

            optimizer.step(closure)
            # begin to predict, no need to track gradient here
            with torch.no_grad():
                future = 10
                pred = seq(test_input, future=future)
                loss = criterion(pred[:, :-future], test_target)
                y = pred.detach().numpy()
                assert np.isfinite(y).all() and math.isfinite(loss.item())
    _assert_healthy(w, steps)


# ============================================================================ vae
class VAE(nn.Module):
    """vae/main.py's VAE on 14x14 images (784 -> 400 -> 20 on MNIST)."""

    def __init__(self, d: int = 196, h: int = 100, z: int = 20) -> None:
        super().__init__()
        self.d = d
        self.fc1 = nn.Linear(d, h)
        self.fc21 = nn.Linear(h, z)
        self.fc22 = nn.Linear(h, z)
        self.fc3 = nn.Linear(z, h)
        self.fc4 = nn.Linear(h, d)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, self.d))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


@pytest.mark.parametrize("seed, record", [(0, False), (1, True)])
def test_vae(seed: int, record: bool) -> None:
    torch.manual_seed(seed)
    x, y = _digits(seed, 64 * 12, size=14)  # transforms.ToTensor() only: [0, 1]
    train_x, train_y, test_x, test_y = x[:640], y[:640], x[640:], y[640:]
    g = _gen(seed + 100)
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    # Reconstruction + KL divergence losses summed over all elements and batch
    def loss_function(recon_x, x, mu, logvar):
        BCE = F.binary_cross_entropy(recon_x, x.view(-1, 196), reduction="sum")
        KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return BCE + KLD

    steps = 0
    with tlw.watch(model, optimizer) as w:
        for _epoch in range(4):
            model.train()
            train_loss = 0.0
            for data, _ in _batches(train_x, train_y, 64, g):
                optimizer.zero_grad()
                recon_batch, mu, logvar = model(data)
                loss = loss_function(recon_batch, data, mu, logvar)
                if record:
                    w.record_loss(loss)
                loss.backward()
                train_loss += loss.item()
                optimizer.step()
                steps += 1
            model.eval()
            test_loss = 0.0
            with torch.no_grad():
                for data, _ in _batches(test_x, test_y, 64, g):
                    recon_batch, mu, logvar = model(data)
                    test_loss += loss_function(recon_batch, data, mu, logvar).item()
                sample = model.decode(torch.randn(64, 20))
                assert sample.shape == (64, 196)
    _assert_healthy(w, steps)


# ============================================================================ gcn
class GraphConv(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, use_bias: bool = False) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.Tensor(input_dim, output_dim))
        nn.init.xavier_normal_(self.kernel)
        self.bias = None
        if use_bias:
            self.bias = nn.Parameter(torch.Tensor(output_dim))
            nn.init.zeros_(self.bias)

    def forward(self, input_tensor: torch.Tensor, adj_mat: torch.Tensor) -> torch.Tensor:
        support = torch.mm(input_tensor, self.kernel)
        output = torch.spmm(adj_mat, support)
        if self.bias is not None:
            output = output + self.bias
        return output


class GCN(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, use_bias=True, dropout_p=0.1) -> None:
        super().__init__()
        self.gc1 = GraphConv(input_dim, hidden_dim, use_bias=use_bias)
        self.gc2 = GraphConv(hidden_dim, output_dim, use_bias=use_bias)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, input_tensor: torch.Tensor, adj_mat: torch.Tensor) -> torch.Tensor:
        x = self.gc1(input_tensor, adj_mat)
        x = F.relu(x)
        x = self.dropout(x)
        x = self.gc2(x, adj_mat)
        return torch.log_softmax(x, dim=1)


def _cora_like(seed: int, nodes: int = 400, words: int = 300, classes: int = 7):
    """Bag-of-words node features (row-normalized, as load_cora does) and a sparse
    symmetric-normalized adjacency D^-1/2 (A + I) D^-1/2 with mostly same-class edges."""
    g = _gen(seed)
    labels = torch.randint(0, classes, (nodes,), generator=g)
    topic = torch.rand(classes, words, generator=g) < 0.05
    features = (
        (torch.rand(nodes, words, generator=g) < 0.01)
        | (topic[labels] & (torch.rand(nodes, words, generator=g) < 0.4))
    ).float()
    features[:, 0] += (features.sum(1) == 0).float()
    features = features / features.sum(1, keepdim=True)
    src = torch.randint(0, nodes, (nodes * 3,), generator=g)
    same = torch.nonzero(labels.unsqueeze(0) == labels.unsqueeze(1))
    pick = same[torch.randint(0, len(same), (nodes * 2,), generator=g)]
    edges = torch.cat([torch.stack([src, torch.randint(0, nodes, (nodes * 3,), generator=g)], 1), pick])
    adj = torch.zeros(nodes, nodes)
    adj[edges[:, 0], edges[:, 1]] = 1.0
    adj = ((adj + adj.t()) > 0).float() + torch.eye(nodes)
    d_inv_sqrt = adj.sum(1).pow(-0.5)
    adj = d_inv_sqrt.unsqueeze(1) * adj * d_inv_sqrt.unsqueeze(0)
    return features, labels, adj.to_sparse()


@pytest.mark.parametrize("seed", SEEDS)
def test_gcn(seed: int) -> None:
    torch.manual_seed(seed)
    features, labels, adj_mat = _cora_like(seed)
    idx = torch.randperm(len(labels), generator=_gen(seed + 100))
    idx_test, idx_val, idx_train = idx[:100], idx[100:200], idx[200:]
    gcn = GCN(features.shape[1], 16, int(labels.max().item()) + 1, use_bias=True, dropout_p=0.5)
    optimizer = torch.optim.Adam(gcn.parameters(), lr=0.01, weight_decay=5e-4)
    criterion = nn.NLLLoss()
    input = (features, adj_mat)

    def test(model, criterion, input, target, mask):
        model.eval()
        with torch.no_grad():
            output = model(*input)
            output, target = output[mask], target[mask]
            loss = criterion(output, target)
            acc = (output.argmax(dim=1) == target).float().sum() / len(target)
        return loss.item(), acc.item()

    def train_iter(epoch, model, optimizer, criterion, input, target, mask_train, mask_val):
        model.train()
        optimizer.zero_grad()
        output = model(*input)
        loss = criterion(output[mask_train], target[mask_train])
        loss.backward()
        optimizer.step()
        test(model, criterion, input, target, mask_train)
        test(model, criterion, input, target, mask_val)

    epochs = 100
    with tlw.watch(gcn, optimizer, loss_fn=criterion) as w:
        for epoch in range(epochs):
            train_iter(epoch + 1, gcn, optimizer, criterion, input, labels, idx_train, idx_val)
        test(gcn, criterion, input, labels, idx_test)
    _assert_healthy(w, epochs)


# ============================================================================ regression
POLY_DEGREE = 4


@pytest.mark.parametrize("seed", SEEDS)
def test_regression(seed: int) -> None:
    torch.manual_seed(seed)
    W_target = torch.randn(POLY_DEGREE, 1) * 5
    b_target = torch.randn(1) * 5

    def make_features(x):
        """Builds features i.e. a matrix with columns [x, x^2, x^3, x^4]."""
        x = x.unsqueeze(1)
        return torch.cat([x**i for i in range(1, POLY_DEGREE + 1)], 1)

    def f(x):
        return x.mm(W_target) + b_target.item()

    def get_batch(batch_size=32):
        random = torch.randn(batch_size)
        x = make_features(random)
        y = f(x)
        return x, y

    fc = torch.nn.Linear(W_target.size(0), 1)
    optimizer = torch.optim.SGD(fc.parameters(), lr=0.1)  # the example: param.data.add_(-0.1 * param.grad)
    steps = 0
    with tlw.watch(fc, optimizer) as w:
        for _batch_idx in range(150):
            batch_x, batch_y = get_batch()
            fc.zero_grad()
            output = F.smooth_l1_loss(fc(batch_x), batch_y)
            loss = output.item()
            output.backward()
            optimizer.step()
            steps += 1
            if loss < 1e-3:  # stop criterion
                break
    _assert_healthy(w, steps)


# ============================================================================ super_resolution
class SRNet(nn.Module):
    """super_resolution/model.py's Net (64/64/32 channels there)."""

    def __init__(self, upscale_factor: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(1, 16, (5, 5), (1, 1), (2, 2))
        self.conv2 = nn.Conv2d(16, 16, (3, 3), (1, 1), (1, 1))
        self.conv3 = nn.Conv2d(16, 8, (3, 3), (1, 1), (1, 1))
        self.conv4 = nn.Conv2d(8, upscale_factor**2, (3, 3), (1, 1), (1, 1))
        self.pixel_shuffle = nn.PixelShuffle(upscale_factor)
        self._initialize_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.pixel_shuffle(self.conv4(x))

    def _initialize_weights(self) -> None:
        nn.init.orthogonal_(self.conv1.weight, nn.init.calculate_gain("relu"))
        nn.init.orthogonal_(self.conv2.weight, nn.init.calculate_gain("relu"))
        nn.init.orthogonal_(self.conv3.weight, nn.init.calculate_gain("relu"))
        nn.init.orthogonal_(self.conv4.weight)


def _smooth_images(seed: int, n: int, size: int) -> torch.Tensor:
    """Y channels of natural-looking images in [0, 1]: smoothed noise."""
    g = _gen(seed)
    x = torch.rand(n, 1, size // 4, size // 4, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("seed, lr", [(0, 0.001), (1, 0.01)])  # the README's --lr, main.py's default
def test_super_resolution(seed: int, lr: float) -> None:
    torch.manual_seed(seed)
    upscale_factor = 3
    hr = _smooth_images(seed, 16 * 12, 24)
    lr_images = F.interpolate(hr, scale_factor=1 / upscale_factor, mode="bicubic").clamp(0, 1)
    train_in, train_hr, test_in, test_hr = lr_images[:160], hr[:160], lr_images[160:], hr[160:]
    g = _gen(seed + 100)
    model = SRNet(upscale_factor=upscale_factor)
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = 0
    with tlw.watch(model, optimizer, loss_fn=criterion) as w:
        for _epoch in range(1, 5):
            # train(epoch)
            epoch_loss = 0.0
            for input, target in _batches(train_in, train_hr, 16, g):
                optimizer.zero_grad()
                loss = criterion(model(input), target)
                epoch_loss += loss.item()
                loss.backward()
                optimizer.step()
                steps += 1
            # test()
            avg_psnr = 0.0
            with torch.no_grad():
                for input, target in _batches(test_in, test_hr, 32, g):
                    prediction = model(input)
                    mse = criterion(prediction, target)
                    avg_psnr += 10 * math.log10(1 / mse.item())
            # checkpoint(epoch)
            _save(model)
    _assert_healthy(w, steps)


# ============================================================================ reinforcement_learning
class CartPole:
    """The classic cart-pole (gym's CartPole-v1 dynamics and termination), numpy only."""

    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    theta_threshold, x_threshold, max_steps = 12 * 2 * math.pi / 360, 2.4, 200

    def __init__(self, seed: int) -> None:
        self.rs = np.random.RandomState(seed)

    def reset(self):
        self.state = self.rs.uniform(-0.05, 0.05, size=4)
        self.t = 0
        return self.state.copy(), {}

    def step(self, action: int):
        x, x_dot, theta, theta_dot = self.state
        force = self.force_mag if action == 1 else -self.force_mag
        total_mass = self.masspole + self.masscart
        polemass_length = self.masspole * self.length
        costheta, sintheta = math.cos(theta), math.sin(theta)
        temp = (force + polemass_length * theta_dot**2 * sintheta) / total_mass
        thetaacc = (self.gravity * sintheta - costheta * temp) / (
            self.length * (4.0 / 3.0 - self.masspole * costheta**2 / total_mass)
        )
        xacc = temp - polemass_length * thetaacc * costheta / total_mass
        x, x_dot = x + self.tau * x_dot, x_dot + self.tau * xacc
        theta, theta_dot = theta + self.tau * theta_dot, theta_dot + self.tau * thetaacc
        self.state = np.array([x, x_dot, theta, theta_dot])
        self.t += 1
        terminated = bool(abs(x) > self.x_threshold or abs(theta) > self.theta_threshold)
        return self.state.copy(), 1.0, terminated, self.t >= self.max_steps, {}


class Policy(nn.Module):
    """reinforcement_learning/reinforce.py's Policy."""

    def __init__(self) -> None:
        super().__init__()
        self.affine1 = nn.Linear(4, 128)
        self.dropout = nn.Dropout(p=0.6)
        self.affine2 = nn.Linear(128, 2)
        self.saved_log_probs: list[torch.Tensor] = []
        self.rewards: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.affine1(x)
        x = self.dropout(x)
        x = F.relu(x)
        action_scores = self.affine2(x)
        return F.softmax(action_scores, dim=1)


EPS = np.finfo(np.float32).eps.item()


@pytest.mark.parametrize("seed", SEEDS)
def test_reinforce(seed: int) -> None:
    gamma = 0.99
    env = CartPole(seed)
    torch.manual_seed(seed)
    policy = Policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)

    def select_action(state):
        state = torch.from_numpy(state).float().unsqueeze(0)
        probs = policy(state)
        m = Categorical(probs)
        action = m.sample()
        policy.saved_log_probs.append(m.log_prob(action))
        return action.item()

    def finish_episode():
        R = 0
        policy_loss = []
        returns = deque()
        for r in policy.rewards[::-1]:
            R = r + gamma * R
            returns.appendleft(R)
        returns = torch.tensor(returns)
        returns = (returns - returns.mean()) / (returns.std() + EPS)
        for log_prob, R in zip(policy.saved_log_probs, returns):
            policy_loss.append(-log_prob * R)
        optimizer.zero_grad()
        policy_loss = torch.cat(policy_loss).sum()
        policy_loss.backward()
        optimizer.step()
        del policy.rewards[:]
        del policy.saved_log_probs[:]

    episodes, lengths = 40, set()
    with tlw.watch(policy, optimizer) as w:
        running_reward = 10
        for _i_episode in range(episodes):
            state, _ = env.reset()
            ep_reward = 0
            for _t in range(1, 10000):
                action = select_action(state)
                state, reward, done, truncated, _ = env.step(action)
                policy.rewards.append(reward)
                ep_reward += reward
                if done or truncated:
                    break
            lengths.add(len(policy.rewards))
            running_reward = 0.05 * ep_reward + (1 - 0.05) * running_reward
            finish_episode()
    assert len(lengths) > 5  # episodes of variable length
    _assert_healthy(w, episodes)


SavedAction = namedtuple("SavedAction", ["log_prob", "value"])


class ActorCritic(nn.Module):
    """reinforcement_learning/actor_critic.py's Policy: a shared body, actor and critic heads."""

    def __init__(self) -> None:
        super().__init__()
        self.affine1 = nn.Linear(4, 128)
        self.action_head = nn.Linear(128, 2)
        self.value_head = nn.Linear(128, 1)
        self.saved_actions: list[SavedAction] = []
        self.rewards: list[float] = []

    def forward(self, x: torch.Tensor):
        x = F.relu(self.affine1(x))
        action_prob = F.softmax(self.action_head(x), dim=-1)
        state_values = self.value_head(x)
        return action_prob, state_values


@pytest.mark.parametrize("seed", SEEDS)
def test_actor_critic(seed: int) -> None:
    gamma = 0.99
    env = CartPole(seed)
    torch.manual_seed(seed)
    model = ActorCritic()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)

    def select_action(state):
        state = torch.from_numpy(state).float()
        probs, state_value = model(state)
        m = Categorical(probs)
        action = m.sample()
        model.saved_actions.append(SavedAction(m.log_prob(action), state_value))
        return action.item()

    def finish_episode():
        R = 0
        saved_actions = model.saved_actions
        policy_losses, value_losses, returns = [], [], []
        for r in model.rewards[::-1]:
            R = r + gamma * R
            returns.insert(0, R)
        returns = torch.tensor(returns)
        returns = (returns - returns.mean()) / (returns.std() + EPS)
        for (log_prob, value), R in zip(saved_actions, returns):
            advantage = R - value.item()
            policy_losses.append(-log_prob * advantage)
            value_losses.append(F.smooth_l1_loss(value, torch.tensor([R])))
        optimizer.zero_grad()
        loss = torch.stack(policy_losses).sum() + torch.stack(value_losses).sum()
        loss.backward()
        optimizer.step()
        del model.rewards[:]
        del model.saved_actions[:]

    episodes, lengths = 40, set()
    with tlw.watch(model, optimizer) as w:
        for _i_episode in range(episodes):
            state, _ = env.reset()
            for _t in range(1, 10000):
                action = select_action(state)
                state, reward, done, truncated, _ = env.step(action)
                model.rewards.append(reward)
                if done or truncated:
                    break
            lengths.add(len(model.rewards))
            finish_episode()
    assert len(lengths) > 5
    _assert_healthy(w, episodes)


# ============================================================================ imagenet (ResNet)
class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet with one BasicBlock per stage and narrow stages (resnet18 has 2 per
    stage, 64-512 channels)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths=(16, 32, 64)) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(widths[0], 1)
        self.layer2 = self._make_layer(widths[1], 2)
        self.layer3 = self._make_layer(widths[2], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        block = BasicBlock(self.inplanes, planes, stride, downsample)
        self.inplanes = planes
        return nn.Sequential(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _color_images(seed: int, n: int, size: int = 32, classes: int = 10):
    """ImageNet-like stand-in after ToTensor + Normalize(mean, std): class-coloured smooth images."""
    g = _gen(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    palette = torch.rand(classes, 3, 1, 1, generator=g)
    base = _smooth_images(seed + 7, n, size).expand(n, 3, size, size)
    x = (0.5 * base + 0.5 * palette[y] * torch.rand(n, 1, 1, 1, generator=g)).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std, y


@pytest.mark.parametrize("seed", SEEDS)
def test_imagenet_resnet(seed: int) -> None:
    torch.manual_seed(seed)
    x, y = _color_images(seed, 32 * 16 + 64)
    train_x, train_y, val_x, val_y = x[:512], y[:512], x[512:], y[512:]
    g = _gen(seed + 100)
    model = ResNet()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    best_acc1, steps = 0.0, 0
    with tlw.watch(model, optimizer, loss_fn=criterion) as w:
        for epoch in range(3):
            # train(train_loader, model, criterion, optimizer, epoch, device, args)
            model.train()
            for images, target in _batches(train_x, train_y, 32, g):
                output = model(images)
                loss = criterion(output, target)
                acc1 = (output.argmax(1) == target).float().mean() * 100
                losses = loss.item()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
            # validate(val_loader, model, criterion, args)
            model.eval()
            correct = 0
            with torch.no_grad():
                for images, target in _batches(val_x, val_y, 32, g):
                    output = model(images)
                    loss = criterion(output, target)
                    correct += int((output.argmax(1) == target).sum())
            acc1 = 100.0 * correct / len(val_y)
            scheduler.step()
            is_best = acc1 > best_acc1
            best_acc1 = max(acc1, best_acc1)
            _save(
                {
                    "epoch": epoch + 1,
                    "arch": "resnet",
                    "state_dict": model.state_dict(),
                    "best_acc1": best_acc1,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "is_best": is_best,
                    "losses": losses,
                }
            )
    _assert_healthy(w, steps)


# ============================================================================ siamese_network
class SiameseNetwork(nn.Module):
    """siamese_network/main.py's SiameseNetwork: a ResNet (1-channel stem, fc removed) applied to
    both images, the two embeddings concatenated, an MLP head and a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet(in_channels=1, widths=(8, 16, 32))
        self.fc_in_features = self.resnet.fc.in_features
        # remove the last layer of resnet18 (linear layer which is before avgpool layer)
        self.resnet = torch.nn.Sequential(*(list(self.resnet.children())[:-1]))
        self.fc = nn.Sequential(
            nn.Linear(self.fc_in_features * 2, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, 1),
        )
        self.sigmoid = nn.Sigmoid()
        self.resnet.apply(self.init_weights)
        self.fc.apply(self.init_weights)

    def init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            m.bias.data.fill_(0.01)

    def forward_once(self, x: torch.Tensor) -> torch.Tensor:
        output = self.resnet(x)
        return output.view(output.size()[0], -1)

    def forward(self, input1: torch.Tensor, input2: torch.Tensor) -> torch.Tensor:
        output1 = self.forward_once(input1)
        output2 = self.forward_once(input2)
        output = torch.cat((output1, output2), 1)
        output = self.fc(output)
        return self.sigmoid(output)


def _pairs(seed: int, n: int):
    """APP_MATCHER stand-in: image pairs of the same class (target 1) or not (target 0), 50/50."""
    x, y = _digits(seed, 2 * n)
    x = _mnist_normalize(x)
    g = _gen(seed + 1)
    first = torch.arange(n)
    same = torch.rand(n, generator=g) < 0.5
    by_class = {int(c): torch.nonzero(y == c).flatten() for c in y.unique()}
    second = []
    for i in range(n):
        c = int(y[i])
        if same[i]:
            pool = by_class[c]
        else:
            pool = torch.nonzero(y != c).flatten()
        second.append(int(pool[torch.randint(0, len(pool), (1,), generator=g)]))
    second = torch.tensor(second)
    targets = (y[first] == y[second]).float()
    return x[first], x[second], targets


@pytest.mark.parametrize("seed, hoisted", [(0, False), (1, True)])
def test_siamese_network(seed: int, hoisted: bool) -> None:
    """``hoisted=False``: as the example, ``criterion = nn.BCELoss()`` inside train(), so the
    watcher gets no loss_fn; ``True``: one criterion, given to watch()."""
    torch.manual_seed(seed)
    a, b, t = _pairs(seed, 32 * 12 + 64)
    g = _gen(seed + 100)
    model = SiameseNetwork()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    shared = nn.BCELoss()

    def loader(lo: int, hi: int, bs: int):
        perm = lo + torch.randperm(hi - lo, generator=g)
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            yield a[idx], b[idx], t[idx]

    def train(model, train_loader, optimizer) -> int:
        model.train()
        criterion = shared if hoisted else nn.BCELoss()
        n = 0
        for images_1, images_2, targets in train_loader:
            optimizer.zero_grad()
            outputs = model(images_1, images_2).squeeze()
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer.step()
            n += 1
        return n

    def test(model, test_loader) -> None:
        model.eval()
        test_loss, correct = 0.0, 0
        criterion = shared if hoisted else nn.BCELoss()
        with torch.no_grad():
            for images_1, images_2, targets in test_loader:
                outputs = model(images_1, images_2).squeeze()
                test_loss += criterion(outputs, targets).sum().item()
                pred = torch.where(outputs > 0.5, 1, 0)
                correct += pred.eq(targets.view_as(pred)).sum().item()

    steps = 0
    with tlw.watch(model, optimizer, loss_fn=shared if hoisted else None) as w:
        for _epoch in range(3):
            steps += train(model, loader(0, 32 * 12, 32), optimizer)
            test(model, loader(32 * 12, 32 * 12 + 64, 64))
            scheduler.step()
    _assert_healthy(w, steps)


# ============================================================================ fast_neural_style
class ConvLayer(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride):
        super().__init__()
        reflection_padding = kernel_size // 2
        self.reflection_pad = nn.ReflectionPad2d(reflection_padding)
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x):
        return self.conv2d(self.reflection_pad(x))


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, kernel_size=3, stride=1)
        self.in1 = nn.InstanceNorm2d(channels, affine=True)
        self.conv2 = ConvLayer(channels, channels, kernel_size=3, stride=1)
        self.in2 = nn.InstanceNorm2d(channels, affine=True)
        self.relu = nn.ReLU()

    def forward(self, x):
        residual = x
        out = self.relu(self.in1(self.conv1(x)))
        out = self.in2(self.conv2(out))
        return out + residual


class UpsampleConvLayer(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, upsample=None):
        super().__init__()
        self.upsample = upsample
        self.reflection_pad = nn.ReflectionPad2d(kernel_size // 2)
        self.conv2d = nn.Conv2d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x):
        x_in = x
        if self.upsample:
            x_in = F.interpolate(x_in, mode="nearest", scale_factor=self.upsample)
        return self.conv2d(self.reflection_pad(x_in))


class TransformerNet(nn.Module):
    """fast_neural_style/neural_style/transformer_net.py (32/64/128 channels and 5 residual
    blocks there)."""

    def __init__(self, c=(8, 16, 32), blocks: int = 2):
        super().__init__()
        self.conv1 = ConvLayer(3, c[0], kernel_size=9, stride=1)
        self.in1 = nn.InstanceNorm2d(c[0], affine=True)
        self.conv2 = ConvLayer(c[0], c[1], kernel_size=3, stride=2)
        self.in2 = nn.InstanceNorm2d(c[1], affine=True)
        self.conv3 = ConvLayer(c[1], c[2], kernel_size=3, stride=2)
        self.in3 = nn.InstanceNorm2d(c[2], affine=True)
        self.res = nn.Sequential(*(ResidualBlock(c[2]) for _ in range(blocks)))
        self.deconv1 = UpsampleConvLayer(c[2], c[1], kernel_size=3, stride=1, upsample=2)
        self.in4 = nn.InstanceNorm2d(c[1], affine=True)
        self.deconv2 = UpsampleConvLayer(c[1], c[0], kernel_size=3, stride=1, upsample=2)
        self.in5 = nn.InstanceNorm2d(c[0], affine=True)
        self.deconv3 = ConvLayer(c[0], 3, kernel_size=9, stride=1)
        self.relu = nn.ReLU()

    def forward(self, X):
        y = self.relu(self.in1(self.conv1(X)))
        y = self.relu(self.in2(self.conv2(y)))
        y = self.relu(self.in3(self.conv3(y)))
        y = self.res(y)
        y = self.relu(self.in4(self.deconv1(y)))
        y = self.relu(self.in5(self.deconv2(y)))
        return self.deconv3(y)


VggOutputs = namedtuple("VggOutputs", ["relu1_2", "relu2_2", "relu3_3", "relu4_3"])


class Vgg16(nn.Module):
    """fast_neural_style/neural_style/vgg.py's Vgg16 (four slices of VGG-16's features, frozen),
    built locally and narrow (the example loads torchvision's pretrained VGG-16)."""

    def __init__(self, requires_grad: bool = False):
        super().__init__()
        torch.manual_seed(1234)

        def conv(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(inplace=True)]

        self.slice1 = nn.Sequential(*conv(3, 8), *conv(8, 8))
        self.slice2 = nn.Sequential(nn.MaxPool2d(2, 2), *conv(8, 16), *conv(16, 16))
        self.slice3 = nn.Sequential(nn.MaxPool2d(2, 2), *conv(16, 32), *conv(32, 32), *conv(32, 32))
        self.slice4 = nn.Sequential(nn.MaxPool2d(2, 2), *conv(32, 32), *conv(32, 32), *conv(32, 32))
        if not requires_grad:
            for param in self.parameters():
                param.requires_grad = False

    def forward(self, X):
        h = self.slice1(X)
        h_relu1_2 = h
        h = self.slice2(h)
        h_relu2_2 = h
        h = self.slice3(h)
        h_relu3_3 = h
        h = self.slice4(h)
        h_relu4_3 = h
        return VggOutputs(h_relu1_2, h_relu2_2, h_relu3_3, h_relu4_3)


def gram_matrix(y):
    (b, ch, h, w) = y.size()
    features = y.view(b, ch, w * h)
    features_t = features.transpose(1, 2)
    return features.bmm(features_t) / (ch * h * w)


def normalize_batch(batch):
    # normalize using imagenet mean and std
    mean = batch.new_tensor([0.485, 0.456, 0.406]).view(-1, 1, 1)
    std = batch.new_tensor([0.229, 0.224, 0.225]).view(-1, 1, 1)
    batch = batch.div_(255.0)
    return (batch - mean) / std


@pytest.mark.parametrize("seed", SEEDS)
def test_fast_neural_style(seed: int) -> None:
    content_weight, style_weight, batch_size = 1e5, 1e10, 4
    images = _color_images(seed, batch_size * 10 + 1, size=32)[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = (images * std + mean).mul(255)  # ToTensor, then transforms.Lambda(lambda x: x.mul(255))
    train_x, style = images[:-1], images[-1:]
    g = _gen(seed + 100)
    torch.manual_seed(seed)
    transformer = TransformerNet()
    optimizer = torch.optim.Adam(transformer.parameters(), 1e-3)
    mse_loss = torch.nn.MSELoss()
    vgg = Vgg16(requires_grad=False)
    style = style.repeat(batch_size, 1, 1, 1)
    features_style = vgg(normalize_batch(style.clone()))
    gram_style = [gram_matrix(y) for y in features_style]
    steps = 0
    with tlw.watch(transformer, optimizer, loss_fn=mse_loss) as w:
        for _e in range(4):
            transformer.train()
            agg_content_loss = agg_style_loss = 0.0
            for batch_id, (x, _) in enumerate(_batches(train_x, torch.zeros(len(train_x)), batch_size, g)):
                n_batch = len(x)
                optimizer.zero_grad()
                y = transformer(x)
                y = normalize_batch(y)
                x = normalize_batch(x)
                features_y = vgg(y)
                features_x = vgg(x)
                content_loss = content_weight * mse_loss(features_y.relu2_2, features_x.relu2_2)
                style_loss = 0.0
                for ft_y, gm_s in zip(features_y, gram_style):
                    gm_y = gram_matrix(ft_y)
                    style_loss += mse_loss(gm_y, gm_s[:n_batch, :, :])
                style_loss *= style_weight
                total_loss = content_loss + style_loss
                total_loss.backward()
                optimizer.step()
                steps += 1
                agg_content_loss += content_loss.item()
                agg_style_loss += style_loss.item()
                if (batch_id + 1) % 5 == 0:  # checkpoint_interval
                    transformer.eval().cpu()
                    _save(transformer.state_dict())
                    transformer.to("cpu").train()
    _assert_healthy(w, steps)
