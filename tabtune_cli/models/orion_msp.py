"""OrionMSP v1.0: TabICL's column embedding, multi-scale sparse row interaction, ICL with a Perceiver memory.

The model (Lexsi's Orion-MSP, derived from TabICL). Each column is embedded by
TabICL's set transformer (inducing points read the context rows only). Each row
is then summarised by ``row_interactor``: for every scale ``s`` in
``row_scales`` the feature embeddings are averaged in contiguous groups of
``s`` (``row_group_mode="pma"``: pooled by learned queries instead), prefixed
with ``row_num_cls`` CLS and ``row_num_global`` global tokens, and passed
through that scale's own encoder with RoPE and a block-sparse mask; the CLS
outputs are averaged over the scales, normalised and concatenated into one
vector per row. The ICL stage first runs a Perceiver memory (latents
cross-attend to the context rows, then every row cross-attends to the latents),
adds the label embedding to the context rows, runs transformer blocks in which
every row attends to the context rows only, and decodes class logits. Beyond
``max_classes`` classes, eval mode builds the reference's class hierarchy
(balanced groups, recursively), so the adapter sets ``native_many_classes``.

What the reference computes and we therefore compute too (the weights were
trained with it): the row mask's ``row_window`` term is dead in the reference
(its local band is multiplied by zero and added to ``-inf``), so a feature token
sees the special tokens and itself only; grouping averages over zero padding;
in eval mode the output keeps ``len(unique(y_train[0]))`` class columns unless
``n_classes`` is given. Not ported: the reference's ``d`` argument (tables with
different feature counts in one batch) and its ``feature_shuffles`` shortcut
(the adapter permutes columns itself).

One deviation, switchable. In the reference, each Perceiver *read* layer ends
with a full ``nn.TransformerEncoderLayer`` across all rows of the table, so
every row, context or query, attends to every query row: a query's prediction
depends on which other queries share the batch (measured: moving one query row
moves the other queries' outputs). ``OrionMSP.isolate_queries`` (an attribute,
not a constructor argument, so official configs load unchanged) restricts that
self-attention to the context rows plus the row itself: queries no longer see
each other and context rows no longer see queries. Off by default (``model.isolate_queries=false``),
as in the reference: the released weights were trained with that computation, and with no setting
tabtune does what the model does. On, a query's answer no longer depends on its batch-mates, at the
price of a computation the weights never saw (on noise-filled random weights the logits move by
up to 2.4e-3: ``tests/test_orion_msp.py::test_isolating_queries_changes_the_outputs_by_what_it_costs``).

Checkpoint format: the official ``Orion-MSP-v1.0.ckpt`` (``Lexsi/Orion-MSP``) is
a torch file holding ``{"config": OrionMSP constructor kwargs, "state_dict": ...}``,
TabICL's container; it is read with ``weights_only=True``, ``_orig_mod.`` /
``module.`` key prefixes are stripped, and keys load strictly. The state dict
keeps every tensor the reference has, including ``row_interactor.pma.*``, which
is unused unless ``row_group_mode="pma"``.

Reused from the ``tabicl`` package (checked equal to the reference numerically
by ``tests/parity``): ``ColEmbedding`` (its ``_compute_embeddings``; the CLS slots
the reference reserves are discarded by the row interaction, so they are not
computed), ``Encoder`` / ``MultiheadAttentionBlock`` (with RoPE for the scale
encoders; with ``train_size`` for the ICL split, which computes the same thing
as the reference's integer attention mask) and ``OneHotAndLinear``. Written
here: the row interaction, the Perceiver memory, the ICL head and the hierarchy.

LoRA. Every attention uses tabicl's packed ``in_proj_weight`` with the live
``out_proj`` of ``tabicl.LiveOutProjAttention`` (the Perceiver's self-attention
layers have their own attention with the same parameters, which also calls
``out_proj``); all other projections are ``nn.Linear`` modules whose forward
runs. ``lora_targets`` turns module-name prefixes into peft
``target_modules`` (plain linears) and ``target_parameters`` (packed
``in_proj_weight``):

=========================  ============================================================
prefix (default)            adapters
=========================  ============================================================
``col_embedder.tf_col``     ``blocks.{i}.multihead_attn{1,2}``: ``attn.in_proj_weight``,
                            ``attn.out_proj``, ``linear1``, ``linear2``
``row_interactor``          ``scale_encoders.{s}.blocks.{i}``: ``attn.in_proj_weight``,
                            ``attn.out_proj``, ``linear1``, ``linear2`` (``pma.*_proj``
                            only in ``pma`` group mode, where they run)
``icl_predictor.tf_icl``    ``blocks.{i}``: ``attn.in_proj_weight``, ``attn.out_proj``,
                            ``linear1``, ``linear2``
``icl_predictor.decoder``   ``decoder.0``, ``decoder.2``
=========================  ============================================================

The Perceiver memory (``icl_predictor.memory``, 16.8 M of the official 43.9 M
parameters) is *not* under the default prefixes, so it stays frozen under
peft; ``lora.target_modules`` may add ``icl_predictor.memory`` (or one of its
layers), which gives its cross- and self-attention ``in_proj_weight``,
``out_proj`` and feed-forward linears live adapters too. The label embedding,
``SkippableLinear`` column projections and learned tokens are never LoRA targets.

Inference is the reference wrapper ``OrionMSPClassifier``'s at its defaults (``orion_members``): its 32
members (Latin-square feature orders, cyclic class shifts drawn from seed 42, half of them on Yeo-Johnson
power-transformed features, each with its standard scaling and outlier clipping fitted on the context), each
member's *logits* averaged after undoing the shift, the mean through a softmax at temperature
``model.softmax_temperature`` (0.9); above ``max_classes`` a member's logits are the hierarchy's
``T * log(p + 1e-6)``, as the reference's forward returns. The numbers reach the members as the user gave
them (``raw_numbers``), and training runs each episode through the same members (``episode_logits``).
Different: a gap is filled (the reference refuses it); queries go through in chunks of up to 8,192 rows with
the context (with ``isolate_queries`` the chunks change no output; without, a chunk's query rows meet as one
reference call's do); on CUDA the reference runs under fp16 autocast by default, we stay in fp32.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tabicl._model.embedding import ColEmbedding
from tabicl._model.encoders import Encoder
from tabicl._model.layers import MultiheadAttention, MultiheadAttentionBlock, OneHotAndLinear
from torch import Tensor, nn

from ..config import ModelConfig, StrategyConfig
from ..errors import TabTuneError
from . import orion_members
from .base import ModelAdapter, Task, load_weights
from .specs.orion_msp import CHECKPOINTS, OrionMSPConfig, OrionMSPSpec  # noqa: F401 (OrionMSPConfig: re-exported)
from .tabicl import PLAIN_LINEAR, _make_attention_live, read_container, write_container

# the reference wrapper's batch_size: members a forward, which decides the orders they see
WRAPPER_BATCH = 8

# rows of queries per attention call when queries see only the context and themselves
QUERY_CHUNK = 1024


# -- row interaction ------------------------------------------------------------------------------

def special_token_mask(seq_len: int, num_special: int, num_random: int, device) -> Tensor:
    """Boolean (seq_len, seq_len) mask, True where attention is blocked.

    Special tokens see and are seen by every token; any other token sees the special tokens and
    itself, plus ``num_random`` random feature tokens per row (drawn per call, as in the reference).
    The reference also builds a +-``row_window`` band, but its arithmetic turns the band into
    ``-inf`` as well, so the trained weights never saw it; we reproduce what it computes.
    """
    idx = torch.arange(seq_len, device=device)
    allowed = (idx[:, None] < num_special) | (idx[None, :] < num_special) | (idx[:, None] == idx[None, :])
    if num_random > 0 and seq_len > num_special + 1:
        for row in range(num_special, seq_len):
            allowed[row, torch.randperm(seq_len - num_special, device=device)[:num_random] + num_special] = True
    return ~allowed


class PMAGroup(nn.Module):
    """Pools feature tokens into ``K`` tokens with learned, position-coded queries (``row_group_mode="pma"``)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.seed = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)

    def forward(self, feats: Tensor, num_groups: int) -> Tensor:
        """Pooled tokens (B, T, num_groups, E) from feature tokens (B, T, H, E)."""
        B, T, H, E = feats.shape
        position = torch.arange(num_groups, device=feats.device, dtype=torch.float32)[:, None]
        omega = torch.exp(torch.arange(0, E, 2, device=feats.device).float() * (-math.log(10000.0) / E))
        # sinusoidal code: sin on even channels, cos on odd ones
        code = torch.stack([torch.sin(position * omega), torch.cos(position * omega)], dim=-1).reshape(num_groups, E)
        queries = self.q_proj(self.seed.reshape(1, E) + code.to(feats.dtype))  # (K, E)
        x = feats.reshape(B * T, H, E)
        scores = queries @ self.k_proj(x).transpose(1, 2) / math.sqrt(E)  # (BT, K, H)
        return (torch.softmax(scores, dim=-1) @ self.v_proj(x)).reshape(B, T, num_groups, E)


class RowInteraction(nn.Module):
    """Multi-scale sparse row interaction: one vector of ``num_cls * embed_dim`` per row."""

    def __init__(self, embed_dim: int, num_blocks: int, nhead: int, dim_feedforward: int, num_cls: int,
                 num_global: int, rope_base: float, dropout: float, activation, norm_first: bool,
                 scales: tuple[int, ...], window: int, num_random: int, group_mode: str):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_cls = num_cls
        self.num_global = num_global
        self.num_special = num_cls + num_global
        self.scales = tuple(sorted({int(s) for s in scales}))
        self.window = int(window)  # kept for the config; see special_token_mask
        self.num_random = int(num_random)
        self.group_mode = group_mode.lower()
        if self.group_mode not in {"contiguous", "pma"}:
            raise ValueError(f"row_group_mode must be 'contiguous' or 'pma', got {group_mode!r}")
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"row_scales must be one or more integers >= 1, got {scales!r}")
        blocks_per_scale = max(1, math.ceil(num_blocks / len(self.scales)))
        self.scale_encoders = nn.ModuleList([
            Encoder(num_blocks=blocks_per_scale, d_model=embed_dim, nhead=nhead, dim_feedforward=dim_feedforward,
                    dropout=dropout, activation=activation, norm_first=norm_first, use_rope=True, rope_base=rope_base)
            for _ in self.scales])
        self.cls_tokens = nn.Parameter(torch.empty(num_cls, embed_dim))
        self.global_tokens = nn.Parameter(torch.empty(num_global, embed_dim))
        nn.init.trunc_normal_(self.cls_tokens, std=0.02)
        nn.init.trunc_normal_(self.global_tokens, std=0.02)
        self.pma = PMAGroup(embed_dim)  # in the state dict whatever the mode, as in the reference
        self.out_ln = nn.LayerNorm(embed_dim) if norm_first else nn.Identity()

    def group(self, feats: Tensor, size: int) -> Tensor:
        """Feature tokens pooled in groups of ``size``: (B, T, ceil(H / size), E)."""
        if self.group_mode == "pma":
            return self.pma(feats, math.ceil(feats.shape[2] / size))
        if size == 1:
            return feats
        B, T, H, E = feats.shape
        pad = -H % size
        if pad:  # the reference averages the last group over its zero padding too
            feats = torch.cat([feats, feats.new_zeros(B, T, pad, E)], dim=2)
        return feats.reshape(B, T, (H + pad) // size, size, E).mean(dim=3)

    def forward(self, feats: Tensor) -> Tensor:
        """Row vectors (B, T, num_cls * E) from feature embeddings (B, T, H, E)."""
        B, T, _, E = feats.shape
        specials = torch.cat([self.cls_tokens.expand(B, T, self.num_cls, E),
                              self.global_tokens.expand(B, T, self.num_global, E)], dim=2)
        cls_outputs = []
        for encoder, size in zip(self.scale_encoders, self.scales):
            out = torch.cat([specials, self.group(feats, size)], dim=2)
            blocked = special_token_mask(out.shape[2], self.num_special, self.num_random, feats.device)
            for block in encoder.blocks:
                out = block(q=out, attn_mask=blocked, rope=encoder.rope)
            cls_outputs.append(out[..., : self.num_cls, :])
        return self.out_ln(torch.stack(cls_outputs).mean(dim=0)).flatten(-2)


# -- Perceiver memory and ICL -----------------------------------------------------------------------

class RowSelfAttention(MultiheadAttention):
    """Self-attention across rows, optionally limited to the first ``context_size`` rows plus each row itself.

    Same parameters as ``nn.MultiheadAttention`` (packed ``in_proj_weight``); ``out_proj`` is called as a
    module and ``in_proj_weight`` is read inside this forward, so peft LoRA on either is live.
    """

    def forward(self, x: Tensor, context_size: int | None = None) -> Tensor:
        """Attention output (..., T, E) for rows ``x`` (..., T, E)."""
        *batch, T, E = x.shape
        heads, head_dim = self.num_heads, E // self.num_heads
        q, k, v = F._in_projection_packed(x, x, x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (t.reshape(*batch, T, heads, head_dim).transpose(-3, -2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if context_size is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            n = context_size
            parts = [F.scaled_dot_product_attention(q[..., :n, :], k[..., :n, :], v[..., :n, :], dropout_p=dropout)]
            for start in range(n, T, QUERY_CHUNK):
                stop = min(start + QUERY_CHUNK, T)
                # a query attends to the context rows and to itself, never to another query
                allowed = torch.cat([torch.ones(stop - start, n, dtype=torch.bool, device=x.device),
                                     torch.eye(stop - start, dtype=torch.bool, device=x.device)], dim=1)
                keys = torch.cat([k[..., :n, :], k[..., start:stop, :]], dim=-2)
                values = torch.cat([v[..., :n, :], v[..., start:stop, :]], dim=-2)
                parts.append(F.scaled_dot_product_attention(q[..., start:stop, :], keys, values, attn_mask=allowed,
                                                            dropout_p=dropout))
            out = torch.cat(parts, dim=-2)
        return self.out_proj(out.transpose(-3, -2).reshape(*batch, T, E))


class SelfAttentionLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (same parameters and arithmetic) on :class:`RowSelfAttention`."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation, norm_first: bool):
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation=activation, norm_first=norm_first,
                         batch_first=True)
        self.self_attn = RowSelfAttention(d_model, nhead, dropout)

    def forward(self, x: Tensor, context_size: int | None = None) -> Tensor:
        """Rows after self-attention and feed-forward, (..., T, E)."""
        if self.norm_first:
            x = x + self.dropout1(self.self_attn(self.norm1(x), context_size))
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x, context_size)))
        return self.norm2(x + self._ff_block(x))


class CrossAttnBlock(nn.Module):
    """Queries after cross-attending to ``kv`` (a tabicl block, plus a residual), then self-attending."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation, norm_first: bool):
        super().__init__()
        self.q_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.kv_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.attn = MultiheadAttentionBlock(d_model, nhead, dim_feedforward, dropout, activation, norm_first)
        self.ffn = SelfAttentionLayer(d_model, nhead, dim_feedforward, dropout, activation, norm_first)

    def forward(self, q: Tensor, kv: Tensor, context_size: int | None = None) -> Tensor:
        """Updated queries (..., Tq, E)."""
        kv = self.kv_norm(kv)
        x = self.attn(self.q_norm(q), kv, kv) + q
        return self.ffn(x, context_size)


class PerceiverMemory(nn.Module):
    """Latents written from the context rows only, then read by every row (``num_latents=0``: no memory)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, num_latents: int, num_layers: int,
                 dropout: float, activation, norm_first: bool):
        super().__init__()
        self.num_latents = int(num_latents)
        if 0 < self.num_latents < 4:
            raise ValueError(f"perc_num_latents must be 0 (no memory) or at least 4, got {num_latents}")
        if self.num_latents <= 0:
            self.latents = None
            self.write_layers, self.read_layers = nn.ModuleList(), nn.ModuleList()
            return
        self.latents = nn.Parameter(torch.empty(self.num_latents, d_model))
        nn.init.trunc_normal_(self.latents, std=0.02)
        blocks = [CrossAttnBlock(d_model, nhead, dim_feedforward, dropout, activation, norm_first)
                  for _ in range(2 * num_layers)]
        self.write_layers = nn.ModuleList(blocks[:num_layers])
        self.read_layers = nn.ModuleList(blocks[num_layers:])

    def forward(self, R: Tensor, context_size: int, isolate_queries: bool) -> Tensor:
        """Rows (B, T, D) after reading the memory written from ``R[:, :context_size]``."""
        if self.latents is None:
            return R
        latents = self.latents.expand(R.shape[0], *self.latents.shape)
        for layer in self.write_layers:
            latents = layer(latents, R[:, :context_size])
        for layer in self.read_layers:
            R = layer(R, latents, context_size if isolate_queries else None)
        return R


class ICLearning(nn.Module):
    """In-context learning over row vectors: (B, T, D) rows -> (B, T, max_classes) logits."""

    def __init__(self, max_classes: int, d_model: int, num_blocks: int, nhead: int, dim_feedforward: int,
                 dropout: float, activation, norm_first: bool, perc_num_latents: int, perc_layers: int):
        super().__init__()
        self.max_classes = max_classes
        self.tf_icl = Encoder(num_blocks=num_blocks, d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward,
                              dropout=dropout, activation=activation, norm_first=norm_first)
        self.ln = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.y_encoder = OneHotAndLinear(max_classes, d_model)
        self.decoder = nn.Sequential(nn.Linear(d_model, d_model * 2), nn.GELU(), nn.Linear(d_model * 2, max_classes))
        self.memory = PerceiverMemory(d_model, nhead, dim_feedforward, perc_num_latents, perc_layers, dropout,
                                      activation, norm_first)

    def forward(self, R: Tensor, y_train: Tensor, isolate_queries: bool) -> Tensor:
        """Logits (B, T, max_classes) for every row; rows past ``y_train``'s length are the queries."""
        n = y_train.shape[1]
        R = self.memory(R, n, isolate_queries)
        R = torch.cat([R[:, :n] + self.y_encoder(y_train.float()), R[:, n:]], dim=1)
        # every row attends to the context rows only (tabicl's train_size split)
        return self.decoder(self.ln(self.tf_icl(R, train_size=n)))

    def class_probabilities(self, R: Tensor, y_train: Tensor, n_classes: int, temperature: float,
                            isolate_queries: bool) -> Tensor:
        """Query-row probabilities (n_query, n_classes) of one table (R: (T, D)), through the class hierarchy.

        A node with at most ``max_classes`` classes predicts them directly; a wider node splits its
        classes (sorted) into ``min(ceil(C / max_classes), max_classes)`` balanced contiguous groups,
        predicts the group on its own context rows relabelled by group, and multiplies by each group's
        own prediction, recursively, as the reference does.
        """
        n = y_train.shape[0]
        queries = R[n:]

        def node(rows: Tensor, labels: Tensor) -> Tensor:
            classes = torch.unique(labels)
            if len(classes) <= self.max_classes:
                local = torch.searchsorted(classes, labels)
                probs = self._softmax(torch.cat([rows, queries]), local, len(classes), temperature, isolate_queries)
                out = queries.new_zeros(len(queries), n_classes)
                out[:, classes.long()] = probs
                return out
            n_groups = min(math.ceil(len(classes) / self.max_classes), self.max_classes)
            group_of_class = torch.cat([torch.full((len(g),), i, device=labels.device)
                                        for i, g in enumerate(balanced_split(len(classes), n_groups))])
            groups = group_of_class[torch.searchsorted(classes, labels)]
            top = self._softmax(torch.cat([rows, queries]), groups, n_groups, temperature, isolate_queries)
            return sum(node(rows[groups == g], labels[groups == g]) * top[:, g:g + 1] for g in range(n_groups))

        return node(R[:n], y_train)

    def _softmax(self, rows: Tensor, labels: Tensor, k: int, temperature: float, isolate_queries: bool) -> Tensor:
        logits = self(rows[None], labels[None], isolate_queries)[0, len(labels):, :k]
        return torch.softmax(logits / temperature, dim=-1)


def balanced_split(n: int, n_groups: int) -> list[range]:
    """``n`` consecutive indices in ``n_groups`` groups, each ``ceil(remaining / groups left)`` long."""
    groups, start = [], 0
    for left in range(n_groups, 0, -1):
        size = math.ceil((n - start) / left)
        groups.append(range(start, start + size))
        start += size
    return groups


class OrionMSP(nn.Module):
    """OrionMSP v1.0. ``forward(X, y_train)`` with the context rows first gives the query rows' class logits.

    The constructor takes the official checkpoint's ``config`` as it is (the reference's keyword names
    and defaults). ``isolate_queries`` (attribute, default False = the reference) keeps query rows out
    of each other's Perceiver read; see the module docstring.
    """

    def __init__(self, max_classes: int = 10, embed_dim: int = 128, col_num_blocks: int = 3, col_nhead: int = 4,
                 col_num_inds: int = 128, row_num_blocks: int = 3, row_nhead: int = 8, row_num_cls: int = 4,
                 row_rope_base: float = 100000, icl_num_blocks: int = 12, icl_nhead: int = 4, ff_factor: int = 2,
                 dropout: float = 0.0, activation="gelu", norm_first: bool = True, row_num_global: int = 2,
                 row_scales: tuple[int, ...] = (1, 4, 8), row_window: int = 4, row_num_random: int = 0,
                 row_group_mode: str = "contiguous", perc_num_latents: int = 16, perc_layers: int = 2):
        super().__init__()
        self.max_classes = max_classes
        self.embed_dim = embed_dim
        self.isolate_queries = False
        self.col_embedder = ColEmbedding(embed_dim=embed_dim, num_blocks=col_num_blocks, nhead=col_nhead,
                                         dim_feedforward=embed_dim * ff_factor, num_inds=col_num_inds,
                                         dropout=dropout, activation=activation, norm_first=norm_first,
                                         reserve_cls_tokens=row_num_cls + row_num_global)
        self.row_interactor = RowInteraction(embed_dim, row_num_blocks, row_nhead, embed_dim * ff_factor, row_num_cls,
                                             row_num_global, row_rope_base, dropout, activation, norm_first,
                                             tuple(row_scales), row_window, row_num_random, row_group_mode)
        icl_dim = embed_dim * row_num_cls
        self.icl_predictor = ICLearning(max_classes, icl_dim, icl_num_blocks, icl_nhead, icl_dim * ff_factor, dropout,
                                        activation, norm_first, perc_num_latents, perc_layers)
        _make_attention_live(self)

    def rows(self, X: Tensor, train_size: int) -> Tensor:
        """Row vectors (B, T, row_num_cls * embed_dim) of a batch of tables X (B, T, H)."""
        features = X.transpose(1, 2).unsqueeze(-1)  # (B, H, T, 1): one set of cells per column
        # the reference pads CLS slots in front of the columns and drops them before the row
        # interaction; columns are embedded independently, so we embed the real ones only
        embeddings = self.col_embedder._compute_embeddings(features, train_size)
        return self.row_interactor(embeddings.transpose(1, 2))

    def forward(self, X: Tensor, y_train: Tensor, return_logits: bool = True, softmax_temperature: float = 0.9,
                n_classes: int | None = None) -> Tensor:
        """Query-row outputs (B, n_query, classes).

        Train mode: all ``max_classes`` logits. Eval mode, as the reference's inference forward: the
        first ``n_classes`` (default: as many as ``y_train[0]`` has distinct labels) logits, or their
        softmax at ``softmax_temperature`` if not ``return_logits``; with more labels (or ``n_classes``)
        than ``max_classes``, the class hierarchy's probabilities, as ``softmax_temperature *
        log(p + 1e-6)`` if ``return_logits``.
        """
        n = y_train.shape[1]
        R = self.rows(X, n)
        if self.training:
            return self.icl_predictor(R, y_train, self.isolate_queries)[:, n:]
        n_labels = len(torch.unique(y_train[0]))
        if max(n_labels, n_classes or 0) <= self.max_classes:
            out = self.icl_predictor(R, y_train, self.isolate_queries)[:, n:, : n_classes or n_labels]
            return out if return_logits else torch.softmax(out / softmax_temperature, dim=-1)
        width = max(n_classes or 0, int(y_train.max().item()) + 1)
        probs = torch.stack([self.icl_predictor.class_probabilities(r, y, width, softmax_temperature,
                                                                    self.isolate_queries)
                             for r, y in zip(R, y_train)])[..., : n_classes or n_labels]
        return softmax_temperature * torch.log(probs + 1e-6) if return_logits else probs


# -- adapter ------------------------------------------------------------------------------------

def _randomise_zero_init(module: nn.Module) -> None:
    """Re-initialise, in place, the residual projections the reference zero-initialises (random-weight sizes only).

    Zero output projections make a random model ignore its attention entirely, so its tests and
    LoRA adapters would see nothing (TabICL's random sizes use ``zero_init=False`` for the same reason).
    """
    for block in module.modules():
        if isinstance(block, MultiheadAttentionBlock):
            block.attn.out_proj.reset_parameters()
            block.linear2.reset_parameters()


def _set_isolation(module: nn.Module, config: ModelConfig | None) -> None:
    """Point every OrionMSP inside ``module`` (peft may wrap it) at the run's ``isolate_queries``."""
    isolate = getattr(config, "isolate_queries", False)
    for sub in module.modules():
        if isinstance(sub, OrionMSP):
            sub.isolate_queries = isolate


class OrionMSPAdapter(OrionMSPSpec, ModelAdapter):
    # -- building ------------------------------------------------------------------------------
    def build(self, config: ModelConfig, task: Task):
        if not config.pretrained:
            architecture = {**self.random_size(config), "max_classes": self.max_classes}
            module = self.from_architecture(architecture)
            _randomise_zero_init(module)
            return module, architecture
        path = self.checkpoint_file(config, task)
        architecture, state = read_container(path, self.title)
        unknown = [k for k in architecture if k not in inspect.signature(OrionMSP).parameters]
        if unknown:
            raise TabTuneError(f"{path}: unknown OrionMSP config key {unknown[0]!r}")
        if isinstance(architecture.get("row_scales"), tuple):
            architecture["row_scales"] = list(architecture["row_scales"])  # JSON, as a run saves it
        module = self.from_architecture(architecture)
        load_weights(module, state, path)
        return module, architecture

    def from_architecture(self, architecture: dict) -> nn.Module:
        try:
            module = OrionMSP(**architecture)
        except (TypeError, ValueError) as exc:
            raise TabTuneError(f"OrionMSP config: {exc}") from None
        module.isolate_queries = False  # the reference's (OrionMSPConfig); the calls below set the run's choice
        return module

    def write_checkpoint(self, module: nn.Module, architecture: dict, task: Task, path: Path) -> Path:
        """The TabICL-style container (``config`` + ``state_dict``) the OrionMSP reference loader reads,
        under the official file name; the state-dict keys are the official ones."""
        return write_container(Path(path) / CHECKPOINTS[task.kind], architecture, module)

    # -- forward -------------------------------------------------------------------------------
    def episode_logits(self, module, X_context: Tensor, y_context: Tensor, X_query: Tensor, task: Task,
                       config=None) -> Tensor:
        """Each episode through the reference wrapper's members fitted on its context (``orion_members``), as
        ``predict`` sees it; ``config.n_estimators`` members (``strategy.train_n_estimators``)."""
        # no config (a caller outside the trainer): the trainer's members an episode, not prediction's 32
        config = config if config is not None else OrionMSPConfig(n_estimators=StrategyConfig.train_n_estimators)
        _set_isolation(module, config)
        temperature = config.softmax_temperature or 0.9

        def forward(X, y):
            return module(X[None], y[None], softmax_temperature=temperature)[0]

        return orion_members.episode_logits(forward, X_context, y_context, X_query, config.n_estimators,
                                            WRAPPER_BATCH, task.n_classes)

    @torch.no_grad()
    def predict(self, module, X_context, y_context, X_query, task: Task, config: ModelConfig, device) -> np.ndarray:
        """The reference wrapper's ``predict_proba`` (``orion_members``): its members, their logits averaged, one
        softmax at ``model.softmax_temperature``."""
        module.eval()
        _set_isolation(module, config)
        temperature = config.softmax_temperature

        def forward(X, y):
            X = torch.as_tensor(X, device=device, dtype=torch.float32)[None]
            y = torch.as_tensor(y, device=device, dtype=torch.float32)[None]
            return module(X, y, return_logits=True, softmax_temperature=temperature)[0].float().cpu().numpy()

        return orion_members.predicted_probabilities(forward, X_context, y_context, X_query, config.n_estimators,
                                                     WRAPPER_BATCH, temperature, task.n_classes)

    # -- LoRA ------------------------------------------------------------------------------------
    def lora_targets(self, module: nn.Module, prefixes):
        targets = self.modules_under(module, prefixes)
        pma_runs = any(isinstance(m, RowInteraction) and m.group_mode == "pma" for m in module.modules())
        # plain linear layers only: SkippableLinear / OneHotAndLinear transform their input before
        # the matmul, so a LoRA beside them would see the wrong input; the PMA projections only run
        # in "pma" group mode, and an adapter on a layer that never runs would be dead weight
        linears = [n for n, m in targets.items() if type(m) in PLAIN_LINEAR and (pma_runs or ".pma." not in f".{n}")]
        packed = [f"{n}.in_proj_weight" for n, m in targets.items() if isinstance(m, MultiheadAttention)]
        return linears, packed
