"""rnngen speed benchmark: run by hand, prints figures and ratios measured in the same run.

    python bench/bench.py [--corpus TEXT] [--ref PATH/TO/ref_lstm.py] [--repeats 3] [--steps 6] [--device cuda]
    python bench/bench.py --only song-memory --threads 1 --repeats 7   # the song memory ratios alone, a minute
    python bench/bench.py --only start-up                              # cold start and load times alone
    python bench/bench.py --only serve-network --threads 1            # the server's network step, 1/8/32 streams

Measures, on this machine and in this run: the fp32 and bf16 matmul peak; rnngen's training
throughput (chars/s and model-FLOPs utilisation) for the default model and for the 2x512
reference shape; the same for ref_lstm.py with that shape (when --ref is given); sampling
chars/s for one stream and for 64 streams; the cost of --max-copy 8 with the bundled model (a
trained model, so it really copies); the cost of the n-gram and song memory with the bundled model;
and the ratios between them. Medians of repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rnngen.modeldir import LoadedModel, load_model
from rnngen.home import bundled_dir
from rnngen.config import ModelConfig, TrainConfig
from rnngen.device import cpu_has_fast_bf16
from rnngen.model import RNNLM
from rnngen.config import SamplingSettings
from rnngen.sampling import SampleRequest, Sampler, state_rows
from rnngen.tokenizer import CharTokenizer

HERE = Path(__file__).resolve().parent


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5, device: torch.device = torch.device("cpu")) -> float:
    """The best of `repeats` timings: a peak, not a typical figure (this is what MFU divides by)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def exact_flops_per_char(cfg: ModelConfig) -> float:
    """Training FLOPs per character: 3x the forward multiply-adds x 2, recurrent layers plus output."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cfg.rnn_type]
    flops = 0
    for layer in range(cfg.num_layers):
        inp = cfg.embedding_dim if layer == 0 else cfg.hidden_size
        flops += 3 * 2 * gates * cfg.hidden_size * (inp + cfg.hidden_size)
    return flops + 3 * 2 * cfg.hidden_size * cfg.vocab_size


def train_throughput(cfg: ModelConfig, tcfg: TrainConfig, steps: int, repeats: int,
                     device: torch.device = torch.device("cpu")) -> float:
    """chars/s of rnngen's training step (the same forward/backward/clip/AdamW as training.py)."""
    from rnngen.device import autocast, pick_dtype
    from rnngen.training import _param_groups

    torch.manual_seed(0)
    model = RNNLM(cfg).train().to(device)
    opt = torch.optim.AdamW(_param_groups(model, tcfg.weight_decay), lr=1e-3)
    dtype = pick_dtype(tcfg.precision, device)
    amp = autocast(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.randint(0, cfg.vocab_size, (tcfg.batch_size, tcfg.seq_len), device=device)
    state = [None]

    def run():
        for _ in range(steps):
            with amp:
                _, h, loss = model(x, state[0], x)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            state[0] = tuple(t.detach() for t in h) if isinstance(h, tuple) else h.detach()
        loss.item()  # waits for the GPU

    return steps * x.numel() / median_time(run, repeats, warmup=1)


def sample_throughput(cfg: ModelConfig, streams: int, length: int, repeats: int,
                      device: torch.device = torch.device("cpu")) -> float:
    torch.manual_seed(0)
    chars = [chr(0x4E00 + i) for i in range(cfg.vocab_size - 2)]
    loaded = LoadedModel(RNNLM(cfg).eval().to(device), CharTokenizer(chars), Path("."), {})
    req = lambda: SampleRequest(seed_text="", length=length, settings=SamplingSettings(0.8), num_samples=streams,
                                random_seed=1)
    sampler = Sampler(loaded)
    t = median_time(lambda: sum(1 for _ in sampler.generate(req())), repeats)
    return streams * length / t


def copy_guard_speed(length: int, repeats: int) -> tuple[float, float]:
    """chars/s of one stream from the bundled model without and with --max-copy 8."""
    loaded = load_model(bundled_dir())
    sampler = Sampler(loaded)
    sampler.index()  # loaded once, before the clock
    speeds = []
    for max_copy in (None, 8):
        req = lambda: SampleRequest(length=length, settings=SamplingSettings(0.8), random_seed=1, max_copy=max_copy)
        speeds.append(length / median_time(lambda: sum(1 for _ in sampler.generate(req())), repeats))
    return speeds[0], speeds[1]


def song_memory_speed(length: int, repeats: int, streams: int = 1) -> tuple[float, float, float] | None:
    """chars/s of `streams` streams from the bundled model: the network alone (the path before song
    memory), network + n-gram (--no-song-memory), and network + n-gram + song memory (the default).
    The three run in turn within each repeat (load from other processes hits all three alike);
    medians of the repeats."""
    loaded = load_model(bundled_dir())
    if loaded.mixture is None:
        return None
    alone = LoadedModel(loaded.model, loaded.tokenizer, loaded.directory,
                        {k: v for k, v in loaded.meta.items() if k not in ("mixture", "song_memory")})
    runs = []
    for model, memory in ((alone, True), (loaded, False), (loaded, True)):
        sampler = Sampler(model)
        req = lambda memory=memory: SampleRequest(length=length, settings=SamplingSettings(0.8), random_seed=1,
                                                  song_memory=memory, num_samples=streams)
        runs.append(lambda sampler=sampler, req=req: sum(1 for _ in sampler.generate(req())))
        runs[-1]()  # warm-up
    times = [[], [], []]
    for _ in range(repeats):
        for run, spent in zip(runs, times):
            t = time.perf_counter()
            run()
            spent.append(time.perf_counter() - t)
    alone_s, base_s, full_s = (statistics.median(t) for t in times)
    return streams * length / alone_s, streams * length / base_s, streams * length / full_s


def song_memory_rows(repeats: int, row) -> None:
    """The song memory figures: one stream and 64, each beside the load average it ran under."""
    for streams, length in ((1, 2000), (64, 200)):
        memory = song_memory_speed(length, repeats, streams)
        if memory:
            alone, base, full = memory
            what = "one stream" if streams == 1 else f"{streams} streams (total)"
            load = f"(load {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} threads)"
            row(f"rnngen sample bundled, {what}, network alone", f"{alone:,.0f} chars/s")
            row(f"rnngen sample bundled, {what}, + n-gram (--no-song-memory)", f"{base:,.0f} chars/s")
            row(f"rnngen sample bundled, {what}, + n-gram + song memory", f"{full:,.0f} chars/s")
            row(f"ratio: {what}, with song memory / network alone", f"{full / alone:.2f}x {load}")


def start_up(repeats: int) -> tuple[float, float, float]:
    """Seconds, medians of `repeats`: `python -c "import torch"`, a cold `rnngen sample --model songci
    --length 1` (a new process; the n-gram tables already in the cache), and rnngen.load("songci")
    in a process that has imported torch."""
    def run(args: list[str]) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, capture_output=True)
        return time.perf_counter() - t

    run(["-m", "rnngen", "sample", "--model", "songci", "--length", "1"])  # builds the cache if it is not there
    torch_s = statistics.median(run(["-c", "import torch"]) for _ in range(repeats))
    sample_s = statistics.median(run(["-m", "rnngen", "sample", "--model", "songci", "--length", "1"])
                                 for _ in range(repeats))
    code = "import time, torch, rnngen; t = time.perf_counter(); rnngen.load('songci', device='cpu'); print(time.perf_counter() - t)"
    load_s = statistics.median(float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                                    text=True).stdout) for _ in range(repeats))
    return torch_s, sample_s, load_s


def start_up_rows(row) -> None:
    torch_s, sample_s, load_s = start_up(5)
    row("python -c 'import torch' (median of 5)", f"{torch_s:.2f} s")
    row("rnngen sample --model songci --length 1, cold (median of 5)", f"{sample_s:.2f} s")
    row("  of which beyond importing torch", f"{sample_s - torch_s:.2f} s")
    row("rnngen.load('songci') after torch is imported (median of 5)", f"{load_s:.2f} s")


def serve_network_rows(repeats: int, row) -> None:
    """The server's network step alone (float32, at least two rows: Sampler(exact=True)) with the
    bundled model, for the batches bench_serve.py's 1, 8 and 32 clients make. With t1 one client's
    time per character in bench_serve.py, n clients get at most n * t1 / (step(n) + t1 - step(1))
    times one client, even if the mixer and HTTP cost nothing for each stream added."""
    sampler = Sampler(load_model(bundled_dir()), exact=True)
    sampler.prepare(2)
    _, one = sampler.prefill([sampler.tok.eos_id])
    times = {}
    with torch.inference_mode():
        for rows in (1, 8, 32):
            state = one if rows == 1 else state_rows(one, torch.zeros(rows, dtype=torch.long))
            tokens = [sampler.tok.eos_id] * rows
            times[rows] = median_time(lambda: sampler.step(tokens, state), max(repeats, 50), warmup=10)
            row(f"server network step, {rows} stream(s) ({max(rows, 2)} rows, float32)", f"{times[rows] * 1e3:.2f} ms")
    for rows in (8, 32):
        row(f"server network step, {rows} streams / 1 stream", f"{times[rows] / times[1]:.2f}x the time "
            f"({torch.get_num_threads()} threads)")


def ref_run(ref: Path, corpus: str, mode: str, extra: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(ref), "--data", corpus, "--mode", mode, *extra],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=str(HERE.parent.parent / "shared" / "corpora" / "tinyshakespeare.txt"))
    p.add_argument("--ref", type=Path, default=HERE.parent.parent / "shared" / "bench" / "ref_lstm.py")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="training steps per timed repeat")
    p.add_argument("--sample-length", type=int, default=500)
    p.add_argument("--device", default="cpu", help="cpu or cuda (model FLOPs utilisation is then of the GPU's peak)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--only", choices=["song-memory", "start-up", "serve-network"],
                   help="run one part: song-memory (its speeds and ratios), start-up (cold sample and load "
                        "times) or serve-network (the server's network step for 1, 8 and 32 streams)")
    a = p.parse_args()
    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    row = lambda k, v: print(f"{k:<58} {v}", flush=True)
    if a.only == "song-memory":
        song_memory_rows(a.repeats, row)
        return
    if a.only == "start-up":
        start_up_rows(row)
        return
    if a.only == "serve-network":
        serve_network_rows(a.repeats, row)
        return

    if not Path(a.corpus).is_file():
        sys.exit(f"no corpus at {a.corpus}; pass --corpus FILE (any UTF-8 text; tinyshakespeare in the issue's figures)")
    text = Path(a.corpus).read_text(encoding="utf-8")
    vocab = len(set(text)) + 2
    row("torch / threads / fast bf16 on this CPU", f"{torch.__version__} / {torch.get_num_threads()} / {cpu_has_fast_bf16()}")
    if dev.type == "cuda":
        row("GPU", torch.cuda.get_device_name())
    peak32 = matmul_peak(torch.float32, repeats=20, device=dev)
    # without AMX / AVX512-BF16, bf16 matmul is emulated and ~100x slower: a small size will do
    n16 = 2048 if cpu_has_fast_bf16() or dev.type == "cuda" else 256
    peak16 = matmul_peak(torch.bfloat16, n=n16, repeats=10 if n16 == 2048 else 2, device=dev)
    row("matmul peak fp32, 2048^2 (GFLOPS)", f"{peak32:.0f}")
    row(f"matmul peak bf16, {n16}^2 (GFLOPS)", f"{peak16:.1f}")
    best_peak = max(peak32, peak16)

    tokens = round(len(text) * 0.9)  # what training would learn from, the validation songs aside
    default = ModelConfig(vocab_size=vocab).sized(tokens)  # what rnngen train chooses for this corpus
    reference = ModelConfig(vocab_size=vocab, hidden_size=512, embedding_dim=128, num_layers=2, dropout=0.0).sized(None)
    results = {}
    shapes = [("2x512", reference)] if default == reference else [("default", default), ("2x512", reference)]
    for name, cfg in shapes:
        tcfg = TrainConfig(batch_size=64, seq_len=128).sized(None) if name == "2x512" else TrainConfig().sized(tokens)
        if name == "2x512" and len(shapes) == 1:
            name = "2x512 (= the default model)"
        cps = train_throughput(cfg, tcfg, a.steps, a.repeats, dev)
        gflops = cps * exact_flops_per_char(cfg) / 1e9
        results[name.split(" ")[0]] = cps
        row(f"rnngen train {name} ({cfg.num_layers}x{cfg.hidden_size}, batch {tcfg.batch_size}x{tcfg.seq_len})",
            f"{cps:,.0f} chars/s, {gflops:.0f} GFLOPS, MFU {gflops / best_peak:.0%} of best peak")

    ref_cps = ref_sample = None
    if a.ref.exists() and dev.type == "cpu":
        runs = [ref_run(a.ref, a.corpus, "bench", ["--steps", str(a.steps * 2 + 5)]) for _ in range(a.repeats)]
        ref_cps = statistics.median(r["chars_s"] for r in runs)
        row("ref_lstm.py train 2x512 fp32 (batch 64x128)", f"{ref_cps:,.0f} chars/s")
        ref_sample = statistics.median(ref_run(a.ref, a.corpus, "sample", [])["carried_2000_chars_s"]
                                       for _ in range(a.repeats))
        row("ref_lstm.py sample, one stream", f"{ref_sample:,.0f} chars/s")

    one = sample_throughput(reference, 1, a.sample_length, a.repeats, dev)
    many = sample_throughput(reference, 64, a.sample_length // 2, a.repeats, dev)
    row("rnngen sample 2x512, one stream", f"{one:,.0f} chars/s")
    row("rnngen sample 2x512, 64 streams (total)", f"{many:,.0f} chars/s")
    free, guarded = copy_guard_speed(2000, a.repeats)
    row("rnngen sample bundled 2x384, one stream", f"{free:,.0f} chars/s")
    row("rnngen sample bundled 2x384, one stream, --max-copy 8", f"{guarded:,.0f} chars/s")
    row("ratio: --max-copy 8 / unconstrained", f"{guarded / free:.2f}x")
    song_memory_rows(a.repeats, row)
    if dev.type == "cpu":
        start_up_rows(row)
    if ref_cps:
        row("ratio: train 2x512 rnngen / ref", f"{results['2x512'] / ref_cps:.2f}x")
        row("ratio: sample one stream rnngen / ref", f"{one / ref_sample:.2f}x")
        row("ratio: sample 64 streams rnngen / ref one stream", f"{many / ref_sample:.2f}x")


if __name__ == "__main__":
    main()
