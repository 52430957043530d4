"""Train the tiny qwen3moe fixture on the Python standard library and write it as a GGUF.

Reads top to bottom: configuration, corpus, tokenizer, model, training, routing measurements,
GGUF export, then validation perplexity through llama-cpp-python (the runtime the project serves).

Why qwen3moe: llama.cpp runs it natively, it is the family of the MoE models people run on small
machines (Qwen3-30B-A3B), it has no shared expert (every FFN byte is an expert byte) and its router is
the plain softmax -> top-k -> renormalise that the predictors and the planner reason about.

    python tools/make_tiny_moe.py --out tests/fixtures/tiny-moe.gguf
    python tools/make_tiny_moe.py --eval-only --out tests/fixtures/tiny-moe.gguf   # re-measure only

Every Config field is also an option (--steps 1000 --min-lr 3e-5 ...); the defaults give the bundled fixture.
The quality fixture (issue 18) is a longer-trained model kept at F16, the reference the quantized files are
scored against (tools/quality_fixture.py); --probe shows during training how much a uniform quantization of
the experts costs in validation perplexity, and --checkpoint lets a long run resume and be exported again:

    python tools/make_tiny_moe.py --dtype F16 --steps 600 --min-lr 3e-5 --expert-init 0.25 --weight-decay 0 \
        --probe Q2_K Q4_K --probe-every 100 \
        --checkpoint build/quality-moe.pt --out tests/fixtures/quality-moe-f16.gguf \
        --report tests/fixtures/quality-moe-f16.report.json

Needs the `train` extra (torch, tokenizers); the final perplexity needs llama-cpp-python.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from edgemoe_llamacpp import files
from edgemoe_llamacpp.corpus import EOT, is_validation, stdlib_files
from edgemoe_llamacpp.engine.perplexity import window_logp
from edgemoe_llamacpp.gguf import quant


# ----------------------------------------------------------------------------- configuration
@dataclass
class Config:
    seed: int = 1337
    vocab_size: int = 4096          # byte-level BPE; small so the embedding stays small
    n_embd: int = 256               # multiple of 256 for K-quants (Q2_K..Q6_K quantize rows of 256); of 32 at least
    n_ff_exp: int = 256             # expert FFN width, the same
    n_layer: int = 8
    n_head: int = 4
    n_head_kv: int = 4
    n_expert: int = 16
    n_expert_used: int = 2          # top-2 of 16: 12.5% of experts per token, OLMoE's ratio
    seq_len: int = 512
    batch_size: int = 8             # 4096 tokens a step
    steps: int = 500
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01     # Switch-style load balancing: keeps experts alive, lets them specialise
    expert_init: float = 0.02       # std of the experts' gate/up at init (down: / sqrt(2 n_layer)); the quality
    #                                 fixture uses 0.25 without weight decay: at 0.02 the experts' SwiGLU output
    #                                 starts small and they barely learn; quantizing them then costs nothing
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    val_percent: int = 5            # files whose path hash falls below this go to validation
    eval_tokens: int = 65536        # validation tokens for the routing and perplexity measurements


# the GGUF types the model can be written at: its matrices at this type; norms and the router stay F32
EXPORT_TYPES = ("Q8_0", "F16")
Q8_0_BLOCK = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]   # 32 values a block
FIXTURE = Path("tests/fixtures/tiny-moe.gguf")     # the bundled runtime fixture: the default options' model


# ----------------------------------------------------------------------------- corpus
def read_corpus(cfg: Config) -> tuple[list[str], list[str]]:
    train, val = [], []
    for rel, p in stdlib_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (val if is_validation(rel, cfg.val_percent) else train).append(text)
    return train, val


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], cfg: Config):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2's split regex, which llama.cpp applies for tokenizer.ggml.pre = "gpt-2"
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=[EOT], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_docs(tok, texts: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int32)


# ----------------------------------------------------------------------------- model
def build_model(cfg: Config):
    import torch
    import torch.nn.functional as F
    from torch import nn

    hd = cfg.n_embd // cfg.n_head

    class RMSNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_eps) * self.weight

    def rope(x, cos, sin):  # NEOX style (halves), as ggml applies it for qwen3moe
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=False)
            self.wk = nn.Linear(cfg.n_embd, cfg.n_head_kv * hd, bias=False)
            self.wv = nn.Linear(cfg.n_embd, cfg.n_head_kv * hd, bias=False)
            self.wo = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=False)
            self.q_norm, self.k_norm = RMSNorm(hd), RMSNorm(hd)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            q = self.q_norm(self.wq(x).view(B, T, cfg.n_head, hd)).transpose(1, 2)     # (B, nh, T, hd)
            k = self.k_norm(self.wk(x).view(B, T, cfg.n_head_kv, hd)).transpose(1, 2)
            v = self.wv(x).view(B, T, cfg.n_head_kv, hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=cfg.n_head != cfg.n_head_kv)
            return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            E, D, Fd = cfg.n_expert, cfg.n_embd, cfg.n_ff_exp
            self.router = nn.Linear(D, E, bias=False)
            s = cfg.expert_init
            self.w_gate = nn.Parameter(torch.randn(E, Fd, D) * s)   # (E, F, D) = GGUF ne {D, F, E}
            self.w_up = nn.Parameter(torch.randn(E, Fd, D) * s)
            self.w_down = nn.Parameter(torch.randn(E, D, Fd) * s / math.sqrt(2 * cfg.n_layer))

        def forward(self, x):
            B, T, D = x.shape
            xf = x.reshape(-1, D)                                       # (N, D)
            probs = F.softmax(self.router(xf), dim=-1)                  # (N, E)
            top_w, top_i = probs.topk(cfg.n_expert_used, dim=-1)        # (N, k)
            top_w = top_w / top_w.sum(-1, keepdim=True)                 # qwen3moe renormalises
            out = self.experts(xf, top_i, top_w)
            flat = top_i.reshape(-1)
            # Switch load-balancing loss: E * sum_e (fraction routed to e) * (mean prob of e)
            frac = torch.bincount(flat, minlength=cfg.n_expert).float() / flat.numel()
            aux = cfg.n_expert * (frac * probs.mean(0)).sum()
            return out.view(B, T, D), aux, top_i.view(B, T, -1)

        def experts(self, xf, top_i, top_w):
            """Every token's k experts as three batched matmuls: the (token, expert) pairs sorted by expert into
            an (E, C, D) batch padded to the busiest expert's count C, the weighted outputs added back per token.
            (A loop over the experts launches kernels per expert and layer: tens of seconds a step at 64.)"""
            N, D = xf.shape
            E, k = cfg.n_expert, cfg.n_expert_used
            flat = top_i.reshape(-1)
            order = flat.argsort(stable=True)
            counts = torch.bincount(flat, minlength=E)
            sorted_e = flat[order]
            slot = torch.arange(len(flat)) - (torch.cumsum(counts, 0) - counts)[sorted_e]   # place in its batch
            index = torch.full((E, int(counts.max())), N, dtype=torch.long)               # N: a zero row, padding
            index[sorted_e, slot] = order // k
            xe = torch.cat([xf, xf.new_zeros(1, D)])[index]                                 # (E, C, D)
            h = F.silu(xe @ self.w_gate.transpose(1, 2)) * (xe @ self.w_up.transpose(1, 2))
            y = h @ self.w_down.transpose(1, 2)                                             # (E, C, D)
            out = torch.zeros_like(xf)
            out.index_add_(0, order // k, y[sorted_e, slot] * top_w.reshape(-1)[order, None])
            return out

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.ffn_norm = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_embd)
            self.attn, self.moe = Attention(), MoE()

        def forward(self, x, cos, sin):
            x = x + self.attn(self.attn_norm(x), cos, sin)
            y, aux, sel = self.moe(self.ffn_norm(x))
            return x + y, aux, sel

    class TinyMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.norm = RMSNorm(cfg.n_embd)
            self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)
            for b in self.blocks:
                nn.init.normal_(b.attn.wo.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
            inv = cfg.rope_base ** (-torch.arange(0, hd, 2).float() / hd)
            ang = torch.arange(cfg.seq_len).float()[:, None] * inv[None]   # (T, hd/2)
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)

        def forward(self, idx, targets=None):
            T = idx.shape[1]
            x = self.embed(idx)
            cos, sin = self.cos[:T], self.sin[:T]
            aux_total, selections = 0.0, []
            for b in self.blocks:
                x, aux, sel = b(x, cos, sin)
                aux_total = aux_total + aux
                selections.append(sel)
            logits = self.head(self.norm(x))
            loss = None
            if targets is not None:
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
            return logits, loss, aux_total / cfg.n_layer, torch.stack(selections)  # sel: (L, B, T, k)

    return TinyMoE()


def batches(data: np.ndarray, cfg: Config, rng: np.random.Generator, skip: int = 0):
    """Random windows of seq_len + 1 tokens, `cfg.batch_size` a step; `skip` steps' draws passed over, so a
    resumed run sees the batches the uninterrupted one would have."""
    import torch
    for _ in range(skip):
        rng.integers(0, len(data) - cfg.seq_len - 1, cfg.batch_size)
    while True:
        starts = rng.integers(0, len(data) - cfg.seq_len - 1, cfg.batch_size)
        x = np.stack([data[s:s + cfg.seq_len] for s in starts])
        y = np.stack([data[s + 1:s + cfg.seq_len + 1] for s in starts])
        yield torch.from_numpy(x).long(), torch.from_numpy(y).long()


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay from lr to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def train(model, train_ids: np.ndarray, cfg: Config, *, checkpoint: Path | None = None, checkpoint_every: int = 100,
          tokenizer_json: str = "", probe=None, probe_every: int = 0) -> float:
    """Train `model` for cfg.steps; returns the seconds spent training (this run's, plus a resumed run's).

    With `checkpoint`, the model, optimizer, step and tokenizer are saved there every `checkpoint_every`
    steps and at the end, and a run started with the file present resumes from it. `probe(step)` is
    called every `probe_every` steps and after the last."""
    import torch
    from tqdm import tqdm

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start, spent = 0, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, cfg)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, spent = state["step"], state["train_seconds"]
        print(f"resumed from {checkpoint} at step {start} ({spent:.0f}s of training)")

    def save(step: int) -> None:
        with files.atomic_output(checkpoint) as tmp:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "config": asdict(cfg),
                        "tokenizer": tokenizer_json, "train_seconds": spent + time.time() - t0}, tmp)

    gen = batches(train_ids, cfg, np.random.default_rng(cfg.seed), skip=start)
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="train", unit="step", initial=start, total=cfg.steps)
    t0 = time.time()
    for step in bar:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(gen)
        _, loss, aux, _ = model(x, y)
        (loss + cfg.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux.item():.3f}", lr=f"{lr:.1e}")
        if step % 100 == 0 or step == cfg.steps - 1:
            tqdm.write(f"step {step:5d}  loss {loss.item():.4f}  aux {aux.item():.4f}  "
                       f"{spent + time.time() - t0:.0f}s")
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step == cfg.steps - 1):
            save(step + 1)
        if probe is not None and ((probe_every and (step + 1) % probe_every == 0) or step == cfg.steps - 1):
            paused = time.time()
            probe(step + 1)
            t0 += time.time() - paused                      # the probe is not training time
            model.train()
    return spent + time.time() - t0


def load_checkpoint(path: Path, cfg: Config) -> dict:
    import torch
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config"] != asdict(cfg):
        diff = sorted(k for k in state["config"] if state["config"][k] != asdict(cfg).get(k))
        sys.exit(f"error: {path} was trained with another configuration ({', '.join(diff)} differ); "
                 f"pass the same options or another --checkpoint")
    return state


# ----------------------------------------------------------------------------- quantization probe
def expert_quant_probe(model, val_ids: np.ndarray, cfg: Config, types: list[str], tokens: int):
    """A probe for `train`: validation perplexity in torch at full precision and with every expert matrix
    quantized to each of `types` and back (ggml's quantizer, as `edgemoe convert` writes a uniform file).
    Returns the function and the list its measurements are appended to."""
    import torch
    from tqdm import tqdm

    ids = val_ids[: tokens + 1]
    results: list[dict] = []

    def probe(step: int) -> None:
        row = {"step": step, "ppl": route(model, ids, cfg)[1]}
        mats = [m for b in model.blocks for m in (b.moe.w_gate, b.moe.w_up, b.moe.w_down)]
        saved = [m.detach().clone() for m in mats]
        for tn in types:
            with torch.no_grad():
                for m in mats:
                    rows = m.detach().float().numpy().reshape(-1, m.shape[-1])          # (E * out, in)
                    back = quant.dequantize(quant.quantize(rows, tn), tn, rows.shape[1])
                    m.copy_(torch.from_numpy(back.reshape(m.shape)))
            row[tn] = route(model, ids, cfg)[1]
            with torch.no_grad():
                for m, orig in zip(mats, saved, strict=True):
                    m.copy_(orig)
        results.append(row)
        tqdm.write(f"probe step {step}: val ppl {row['ppl']:.3f}" + "".join(
            f", experts at {tn} {row[tn]:.3f} ({row[tn] / row['ppl'] - 1:+.2%})" for tn in types))

    return probe, results


# ----------------------------------------------------------------------------- routing measurements
def route(model, ids: np.ndarray, cfg: Config) -> tuple[np.ndarray, float]:
    """Chosen experts for every token of `ids` (L, N, k) and the torch model's perplexity on them."""
    import torch
    model.eval()
    n = (len(ids) - 1) // cfg.seq_len * cfg.seq_len
    sels, nll, count = [], 0.0, 0
    with torch.no_grad():
        for s in range(0, n, cfg.seq_len * cfg.batch_size):
            chunk = ids[s:min(n, s + cfg.seq_len * cfg.batch_size) + 1]
            m = (len(chunk) - 1) // cfg.seq_len
            x = torch.from_numpy(chunk[:m * cfg.seq_len].reshape(m, cfg.seq_len)).long()
            y = torch.from_numpy(chunk[1:m * cfg.seq_len + 1].reshape(m, cfg.seq_len)).long()
            _, loss, _, sel = model(x, y)
            nll += loss.item() * y.numel()
            count += y.numel()
            sels.append(sel.reshape(cfg.n_layer, -1, cfg.n_expert_used).numpy())
    return np.concatenate(sels, axis=1), math.exp(nll / count)


def routing_report(train_sel: np.ndarray, val_sel: np.ndarray, cfg: Config) -> dict:
    """Usage entropy per layer, and recall of next-layer experts predicted by a table learned on train."""
    E, k, L = cfg.n_expert, cfg.n_expert_used, cfg.n_layer
    entropy = []
    for layer in range(L):
        p = np.bincount(val_sel[layer].ravel(), minlength=E) / val_sel[layer].size
        entropy.append(float(-(p[p > 0] * np.log2(p[p > 0])).sum()))
    recall = []
    for layer in range(L - 1):
        table = np.zeros((E, E))
        for i in range(k):
            for j in range(k):
                np.add.at(table, (train_sel[layer][:, i], train_sel[layer + 1][:, j]), 1)
        table /= np.maximum(table.sum(1, keepdims=True), 1)
        score = table[val_sel[layer]].sum(1)                         # (N, E)
        pred = np.argsort(-score, axis=1)[:, :k]
        hit = (pred[:, :, None] == val_sel[layer + 1][:, None, :]).any(2).sum(1)
        recall.append(float(hit.mean() / k))
    return {"usage_entropy_bits": entropy, "uniform_entropy_bits": math.log2(E),
            "next_layer_recall_at_k": recall, "chance_recall": k / E}


def unigram_ppl(train_ids: np.ndarray, val_ids: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[val_ids[1:]].mean()))


# ----------------------------------------------------------------------------- GGUF export
def write_gguf(model, tok, cfg: Config, path: Path, provenance: dict, dtype: str = "Q8_0") -> None:
    """The model as a qwen3moe GGUF with its matrices at `dtype` (Q8_0 or F16); norms and the router F32."""
    import gguf
    qt = gguf.GGMLQuantizationType[dtype]
    tmp = files.temporary_beside(path)
    w = gguf.GGUFWriter(str(tmp), "qwen3moe")
    w.add_name("edgemoe tiny-moe")
    w.add_description(json.dumps(provenance, sort_keys=True))
    w.add_context_length(cfg.seq_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff_exp)
    w.add_expert_feed_forward_length(cfg.n_ff_exp)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_key_length(cfg.n_embd // cfg.n_head)
    w.add_value_length(cfg.n_embd // cfg.n_head)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.n_expert_used)
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{dtype}"])

    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    eot = tok.token_to_id(EOT)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i == eot else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_add_bos_token(False)

    def f32(t):
        return t.detach().float().numpy().astype(np.float32)

    def mat(name, t):
        w.add_tensor(name, gguf.quants.quantize(f32(t), qt), raw_dtype=qt)

    mat("token_embd.weight", model.embed.weight)
    w.add_tensor("output_norm.weight", f32(model.norm.weight))
    mat("output.weight", model.head.weight)
    for i, b in enumerate(model.blocks):
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(b.attn_norm.weight))
        mat(f"blk.{i}.attn_q.weight", b.attn.wq.weight)
        mat(f"blk.{i}.attn_k.weight", b.attn.wk.weight)
        mat(f"blk.{i}.attn_v.weight", b.attn.wv.weight)
        mat(f"blk.{i}.attn_output.weight", b.attn.wo.weight)
        w.add_tensor(f"blk.{i}.attn_q_norm.weight", f32(b.attn.q_norm.weight))
        w.add_tensor(f"blk.{i}.attn_k_norm.weight", f32(b.attn.k_norm.weight))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(b.ffn_norm.weight))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", f32(b.moe.router.weight))   # router stays F32
        mat(f"blk.{i}.ffn_gate_exps.weight", b.moe.w_gate)
        mat(f"blk.{i}.ffn_up_exps.weight", b.moe.w_up)
        mat(f"blk.{i}.ffn_down_exps.weight", b.moe.w_down)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    files.commit(tmp, path)


# ----------------------------------------------------------------------------- llama.cpp perplexity
def llama_cpp_ppl(path: Path, ids: np.ndarray, n_ctx: int, max_tokens: int) -> tuple[float, int]:
    """Perplexity of `ids` as llama.cpp computes it, in independent windows of n_ctx tokens."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for s in range(0, min(len(ids), max_tokens) - n_ctx, n_ctx):
        window = ids[s:s + n_ctx].tolist()
        logp = window_logp(llm, window)
        nll -= logp[np.arange(n_ctx - 1), window[1:]].sum()
        count += n_ctx - 1
    llm.close()
    return math.exp(nll / count), count


def config_options(ap: argparse.ArgumentParser) -> None:
    """One option per Config field (--n-ff-exp, --lr, ...), defaulting to the bundled fixture's value."""
    for f in fields(Config):
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                        metavar=type(f.default).__name__.upper(), help=f"default {f.default}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=FIXTURE)
    ap.add_argument("--dtype", choices=EXPORT_TYPES, default="Q8_0",
                    help="type of the written matrices (F16: an unquantized reference for quality comparisons)")
    ap.add_argument("--eval-only", action="store_true", help="skip training; measure the GGUF at --out")
    ap.add_argument("--report", type=Path, help="write the measurements as JSON here")
    ap.add_argument("--checkpoint", type=Path,
                    help="save training state here; resume from it if present (a finished one: export only)")
    ap.add_argument("--checkpoint-every", type=int, default=100, metavar="STEPS")
    ap.add_argument("--probe", nargs="+", default=[], metavar="TYPE",
                    help="also measure validation perplexity with the experts quantized to these types")
    ap.add_argument("--probe-every", type=int, default=0, metavar="STEPS", help="and during training, this often")
    ap.add_argument("--probe-tokens", type=int, default=16384)
    config_options(ap)
    args = ap.parse_args()
    for out, what, written in ((args.out, "--out", not args.eval_only), (args.report, "--report", True),
                               (args.checkpoint, "--checkpoint", True)):
        if out is not None and written:
            files.tool_output(out, what)
    cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    for name in ("n_embd", "n_ff_exp"):
        width, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        if width % Q8_0_BLOCK:
            sys.exit(f"error: {flag} must be a multiple of {Q8_0_BLOCK}: Q8_0 quantizes rows in blocks of "
                     f"{Q8_0_BLOCK} values")
        if width % QK_K:
            print(f"note: {flag} {width} is not a multiple of {QK_K}: `edgemoe convert` cannot give this model's "
                  f"experts K-quant types (rows of {QK_K} values); Q8_0 and F16 files and inflate_experts.py can")
    if args.out.resolve() == FIXTURE.resolve() and (cfg != Config() or args.dtype != "Q8_0") and not args.eval_only:
        sys.exit(f"error: {FIXTURE} is the bundled runtime fixture, written only with the default options; "
                 f"pass --out for another model")
    for tn in args.probe:
        if tn not in quant.PLAN_TYPES:
            sys.exit(f"error: --probe types are {', '.join(quant.PLAN_TYPES)}; not {tn!r}")

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    train_txt, val_txt = read_corpus(cfg)
    print(f"corpus: Python {sys.version.split()[0]} stdlib, {len(train_txt)} train files, "
          f"{len(val_txt)} validation files")

    import torch
    from tokenizers import Tokenizer
    torch.manual_seed(cfg.seed)
    resume = args.checkpoint is not None and args.checkpoint.exists() and not args.eval_only
    # a resumed run keeps the tokenizer its model was trained with
    tok = (Tokenizer.from_str(load_checkpoint(args.checkpoint, cfg)["tokenizer"]) if resume
           else train_tokenizer(train_txt, cfg))
    train_ids, val_ids = encode_docs(tok, train_txt), encode_docs(tok, val_txt)
    print(f"tokens: {len(train_ids):,} train, {len(val_ids):,} validation (vocab {tok.get_vocab_size()})")
    report: dict = {"config": asdict(cfg), "python": sys.version.split()[0],
                    "train_tokens": len(train_ids), "val_tokens": len(val_ids)}

    if not args.eval_only:
        model = build_model(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: qwen3moe {cfg.n_layer} layers, {cfg.n_expert} experts top-{cfg.n_expert_used}, "
              f"{n_params / 1e6:.1f}M parameters")
        probe, probes = (expert_quant_probe(model, val_ids, cfg, args.probe, args.probe_tokens) if args.probe
                         else (None, []))
        report["train_seconds"] = train(model, train_ids, cfg, checkpoint=args.checkpoint,
                                        checkpoint_every=args.checkpoint_every, tokenizer_json=tok.to_str(),
                                        probe=probe, probe_every=args.probe_every)
        if probe is not None and not probes:                 # a finished checkpoint: no step ran
            probe(cfg.steps)
        if probes:
            report["expert_quant_probe"] = {"tokens": args.probe_tokens, "rows": probes}
        report["parameters"] = n_params
        train_sel, _ = route(model, train_ids[: cfg.eval_tokens + 1], cfg)
        val_sel, torch_ppl = route(model, val_ids[: cfg.eval_tokens + 1], cfg)
        report["routing"] = routing_report(train_sel, val_sel, cfg)
        report["torch_val_ppl"] = torch_ppl
        print(f"validation perplexity (torch, fp32): {torch_ppl:.3f}")
        for key, val in report["routing"].items():
            print(f"{key}: {np.round(val, 3).tolist() if isinstance(val, list) else round(val, 3)}")
        provenance = {"tool": "tools/make_tiny_moe.py", "corpus": "python-stdlib",
                      "python": report["python"], "seed": cfg.seed, "steps": cfg.steps}
        if cfg != Config():                                  # the bundled fixture's description stays as it was
            provenance["config"] = {k: v for k, v in asdict(cfg).items() if v != getattr(Config, k)}
            provenance["train_seconds"] = round(report["train_seconds"])
        write_gguf(model, tok, cfg, args.out, provenance, args.dtype)
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")

    report["dtype"], report["file_bytes"] = args.dtype, args.out.stat().st_size
    report["unigram_val_ppl"] = unigram_ppl(train_ids, val_ids, tok.get_vocab_size())
    print(f"validation perplexity (unigram model of train): {report['unigram_val_ppl']:.3f}")
    ppl, n = llama_cpp_ppl(args.out, val_ids, cfg.seq_len, cfg.eval_tokens)
    report["llama_cpp_val_ppl"], report["llama_cpp_val_tokens"] = ppl, n
    print(f"validation perplexity (llama-cpp-python, {n} tokens): {ppl:.3f}")
    if args.report:
        files.write_text(args.report, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
