"""The language model: embedding -> stacked LSTM / GRU / tanh RNN -> linear over the vocabulary."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from rnngen.config import ModelConfig

RNN_MODULES: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # nn.RNN / nn.LSTM layout: (layers, batch, hidden)


GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # rows of each layer's weight matrices, in hidden_size units


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor RNNLM(config).state_dict() holds, worked out without building
    it (a damaged config then costs no allocation, and no meta-device start-up: ~1 s on first use)."""
    G, H, E, V = GATES[config.rnn_type] * config.hidden_size, config.hidden_size, config.embedding_dim, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (V, E)}
    for layer in range(config.num_layers):
        shapes.update({f"rnn.weight_ih_l{layer}": (G, E if layer == 0 else H), f"rnn.weight_hh_l{layer}": (G, H),
                       f"rnn.bias_ih_l{layer}": (G,), f"rnn.bias_hh_l{layer}": (G,)})
    shapes.update({"head.weight": (V, H), "head.bias": (V,)})
    return shapes


class RNNLM(nn.Module):
    """Embedding -> stacked RNN -> linear. The regularisation (all off in eval mode, so a trained model
    predicts and samples with its plain weights): `dropout` on the embedding output, between layers
    and before the output layer; `embedding_dropout` drops whole rows of the embedding (every use of
    a token in the batch at once); `weight_drop` is DropConnect on each layer's hidden-to-hidden
    matrix, a fresh mask per forward pass (AWD-LSTM's weight drop). A config whose settings are None
    (chosen from the corpus size when training) gets the settings for a large corpus."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config = config.sized(None)
        if config.tie_weights and config.embedding_dim != config.hidden_size:
            raise ValueError("tie_weights needs embedding_dim == hidden_size")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        rnn_kwargs = {"nonlinearity": "tanh"} if config.rnn_type == "rnn" else {}
        self.rnn = RNN_MODULES[config.rnn_type](
            config.embedding_dim, config.hidden_size, config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0, **rnn_kwargs,
        )
        self.drop = nn.Dropout(config.dropout)
        self._recurrent = [f"weight_hh_l{layer}" for layer in range(config.num_layers)]  # weight_drop's targets
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_weights:
            self.head.weight = self.embedding.weight
        self._init_weights()
        self._cells: list[tuple[torch.Tensor, ...]] | None = None

    def _init_weights(self) -> None:
        # torch's own initialisation (a forget-gate bias of 1 measured slightly worse here),
        # except a small embedding when it doubles as the output matrix
        if self.config.tie_weights:
            nn.init.normal_(self.embedding.weight, std=0.1)

    @torch.no_grad()
    def init_output_bias(self, counts: torch.Tensor) -> None:
        """Start the output at the training text's unigram log-frequencies (add-one smoothed);
        `counts[i]` is how often token i occurs in the training text.

        Otherwise Adam needs thousands of small steps just to move the biases of thousands of
        characters to their frequencies, and the model sits on a unigram plateau meanwhile.
        """
        counts = counts.float() + 1.0
        self.head.bias.copy_((counts / counts.sum()).log())

    def forward(
        self, ids: torch.Tensor, state: State | None = None, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """ids (batch, seq) -> logits (batch, seq, vocab), new state, None; or, given targets
        (batch, seq): None, new state, mean cross-entropy. The loss is worked out a slice of
        positions at a time, so (batch x seq x vocab) logits never exist at once."""
        # the recurrent layers run time-major: oneDNN's LSTM measured ~10 % faster that way
        y, state = self.recur(self.embed(ids.t()), state)
        y = self.drop(y)
        if targets is None:
            return self.head(y).transpose(0, 1), state, None
        flat, want = y.flatten(0, 1), targets.t().flatten()
        if torch.is_grad_enabled():
            loss = _HeadLoss.apply(flat, self.head.weight, self.head.bias, want)
        else:
            loss = head_nll(flat, self.head.weight, self.head.bias, want) / want.numel()
        return None, state, loss

    def read(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids (batch, seq) -> the logits after the last token (batch, vocab) and the new state: a
        prompt read for sampling, without the output layer at every position."""
        y, state = self.recur(self.embed(ids.t()), state)
        return self.head(self.drop(y[-1])), state

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (seq, batch) -> the recurrent layers' input (seq, batch, embedding), dropped out when training."""
        p = self.config.embedding_dropout
        if not (self.training and p):
            return self.drop(self.embedding(ids))
        weight = self.embedding.weight  # a whole row dropped: the token is unknown for this batch
        keep = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
        return self.drop(F.embedding(ids, weight * keep))

    def recur(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """The recurrent layers: x (seq, batch, embedding) -> (seq, batch, hidden), new state. With
        weight_drop, when training, each hidden-to-hidden matrix is dropped out for this call; the
        module keeps its parameters (cuDNN / oneDNN read them as given), the masked copies are passed
        in for the call alone."""
        p = self.config.weight_drop
        if not (self.training and p):
            return self.rnn(x, state)
        dropped = {name: F.dropout(getattr(self.rnn, name), p) for name in self._recurrent}
        return torch.func.functional_call(self.rnn, dropped, (x, state))

    # ---- one token at a time, for sampling -------------------------------------------------
    # nn.LSTM called per token pays a large fixed cost per call; one fused matmul per layer is
    # several times faster and gives the same numbers (see bench/).

    def prepare_step(self, half: bool = False) -> None:
        """Cache fused per-layer weights for step(); call again after the weights change.

        half: keep them as float16 (out, in) matrices for one stream on a CPU. Reading the weights
        once per token is what one stream costs there, and fp16 halves the bytes: measured ~2x
        faster per layer than fp32 (addmv; fp16 addmm is far slower on CPUs). Logits then differ
        from forward()'s by ~1e-3, which sampling does not notice.
        """
        cells = []
        for layer in range(self.config.num_layers):
            w_ih = getattr(self.rnn, f"weight_ih_l{layer}").detach()
            w_hh = getattr(self.rnn, f"weight_hh_l{layer}").detach()
            b_ih = getattr(self.rnn, f"bias_ih_l{layer}").detach()
            b_hh = getattr(self.rnn, f"bias_hh_l{layer}").detach()
            if self.config.rnn_type == "gru":  # the candidate gate needs r * (W_hn h), so keep them apart
                cells.append((w_ih.t().contiguous(), b_ih, w_hh.t().contiguous(), b_hh))
                continue
            w, b = torch.cat([w_ih, w_hh], 1), b_ih + b_hh
            if self.config.rnn_type == "lstm":  # gates i, f, g, o -> i, f, o, g: one sigmoid over 3H
                H = self.config.hidden_size
                order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
                w, b = w[order], b[order]
            cells.append((w.t().contiguous(), b))
        head = (self.head.weight.detach().t().contiguous(), self.head.bias.detach())
        if half:  # matrices as (out, in), see _affine
            cells = [tuple(t.t().contiguous().half() if t.dim() == 2 else t.half() for t in cell) for cell in cells]
            head = (head[0].t().contiguous().half(), head[1].half())
        self._cells, self._head = cells, head

    def step_state(self, state: State | None, batch: int, device: torch.device) -> list:
        """Convert an nn-layout state (or None) into the per-layer list step() carries."""
        L, H = self.config.num_layers, self.config.hidden_size
        if state is None:
            zeros = torch.zeros(L, batch, H, device=device)
            state = (zeros, zeros.clone()) if self.config.rnn_type == "lstm" else zeros
        if self.config.rnn_type == "lstm":
            return [(state[0][i], state[1][i]) for i in range(L)]
        return [state[i] for i in range(L)]

    def step(self, ids: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        """ids (batch,) -> logits (batch, vocab); state is step_state()'s per-layer list."""
        assert self._cells is not None, "call prepare_step() first"
        x = self.embedding(ids)
        H, kind, new_state = self.config.hidden_size, self.config.rnn_type, []
        for cell, s in zip(self._cells, state):
            if kind == "lstm":
                h, c = s
                gates = _affine(cell[0], cell[1], torch.cat([x, h], 1))
                ifo = gates[:, : 3 * H].sigmoid()
                g = gates[:, 3 * H :].tanh()
                c = torch.addcmul(ifo[:, H : 2 * H] * c, ifo[:, :H], g)
                h = ifo[:, 2 * H :] * c.tanh()
                new_state.append((h, c))
            elif kind == "gru":
                gi = _affine(cell[0], cell[1], x)
                gh = _affine(cell[2], cell[3], s)
                ir, iz, inn = gi.split(H, 1)
                hr, hz, hn = gh.split(H, 1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                h = (1 - z) * torch.tanh(inn + r * hn) + z * s
                new_state.append(h)
            else:
                h = torch.tanh(_affine(cell[0], cell[1], torch.cat([x, s], 1)))
                new_state.append(h)
            x = h
        return _affine(*self._head, x), new_state


def _affine(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x (batch, in) -> x @ w + b (batch, out), float32. A float16 w is (out, in) and batch is 1."""
    if w.dtype == torch.float16:
        return torch.addmv(b, w, x[0].half()).float().unsqueeze(0)
    return torch.addmm(b, x, w)


HEAD_CHUNK_ELEMENTS = 1 << 22  # logits made at once by the loss: 16 MB in float32


def _chunks(rows: int, vocab: int) -> tuple[range, int]:
    step = max(64, HEAD_CHUNK_ELEMENTS // vocab)
    return range(0, rows, step), step


def head_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of linear(hidden) against targets, a slice of rows at a time (no grad)."""
    starts, step = _chunks(hidden.size(0), weight.size(0))
    total = torch.zeros((), device=hidden.device)
    for s in starts:
        logits = F.linear(hidden[s : s + step], weight, bias).float()
        total += F.cross_entropy(logits, targets[s : s + step], reduction="sum")
    return total


class _HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of linear(hidden) against targets, with the gradients worked out in the
    same sliced pass (softmax minus one-hot is all backward needs), so a big vocabulary costs
    (slice x vocab) memory instead of three (positions x vocab) tensors, and nothing is recomputed.
    One backward call, so DistributedDataParallel's hooks see an ordinary graph."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor):
        n = hidden.size(0)
        g_hidden = torch.empty_like(hidden)
        g_weight = torch.zeros(weight.shape, device=weight.device)
        g_bias = torch.zeros(bias.shape, device=bias.device)
        total = torch.zeros((), device=hidden.device)
        starts, step = _chunks(n, weight.size(0))
        for s in starts:
            h, t = hidden[s : s + step], targets[s : s + step]
            logits = F.linear(h, weight, bias).float()  # (slice, vocab)
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
            grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
            grad[torch.arange(t.numel(), device=t.device), t] -= 1.0  # d(sum of losses)/d(logits), within [-1, 1]
            g_hidden[s : s + step] = grad.to(h.dtype) @ weight.to(h.dtype)
            g_weight += grad.t().to(h.dtype) @ h
            g_bias += grad.sum(0)
        ctx.save_for_backward(g_hidden, g_weight.to(weight.dtype), g_bias.to(bias.dtype))
        ctx.n = n
        return total / n

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # the 1/n of the mean is applied here, with the (loss-scaled, under fp16) upstream gradient:
        # gradients of a sum stay well inside float16's range, those of a mean could underflow
        g_hidden, g_weight, g_bias = ctx.saved_tensors
        g = g / ctx.n
        return g_hidden * g.to(g_hidden.dtype), g_weight * g, g_bias * g, None


@torch.no_grad()
def token_nll(model: RNNLM, ids: torch.Tensor, streams: int = 64, seq_len: int = 256, amp=None) -> torch.Tensor:
    """The negative log-likelihood (nats) of each of ids[1:] given what precedes it (see sum_nll for the cutting)."""
    n = ids.numel() - 1
    out = torch.zeros(max(n, 0))
    if n < 1:
        return out
    was_training = model.training
    model.eval()
    rows = max(1, min(streams, n // 64))
    cols = n // rows
    device = next(model.parameters()).device
    for offset, part in ((0, ids[: rows * cols + 1]), (rows * cols, ids[rows * cols :])):  # the block, then the tail
        m = part.numel() - 1
        if m < 1:
            continue
        r = rows if offset == 0 else 1
        c = m // r
        idx = torch.arange(r).unsqueeze(1) * c + torch.arange(c + 1)
        block = part[idx].to(device)
        state = None
        for start in range(0, c, seq_len):
            x = block[:, start : start + seq_len]
            y = block[:, start + 1 : start + 1 + seq_len]
            x = x[:, : y.size(1)]
            with amp or nullcontext():
                hidden, state = model.recur(model.embed(x.t()), state)  # (seq, batch, hidden)
                flat, want = hidden.flatten(0, 1), y.t().flatten()
                starts, step = _chunks(flat.size(0), model.config.vocab_size)
                nll = torch.cat([F.cross_entropy(model.head(flat[s : s + step]).float(), want[s : s + step],
                                                 reduction="none") for s in starts])
            where = offset + idx[:, start : start + y.size(1)].t().flatten()  # each target's place in ids[1:]
            out[where] = nll.cpu()
    model.train(was_training)
    return out


def sum_nll(model: RNNLM, ids: torch.Tensor, streams: int = 64, seq_len: int = 256, amp=None) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of predicting ids[1:] from what precedes, and the count.

    The stream is cut into `streams` contiguous rows, read together in windows with the state
    carried, and the leftover tail as one more row. Each row starts from a zero state, so the
    figure is a touch pessimistic next to a single pass (a few dozen restarts in a long text);
    with streams=1 it equals one pass exactly.
    """
    nll = token_nll(model, ids, streams, seq_len, amp)
    return float(nll.double().sum()), nll.numel()
