"""OrionBix (Lexsi's Orion-BiX v1.1): a TabICL-style in-context classifier with bi-axial row attention.

The model. Three stages, as in TabICL:

1. Column embedding (``col_embedder``). Every column is padded on the left with ``row_num_cls``
   reserved columns of -100 (the skip value), each cell goes through ``Linear(1, E)``, and each
   column's cells go through ``tf_col``: blocks of *linear* attention (feature map ELU+1, post-norm),
   where every row reads the training rows only. The block output gives a per-cell scale and shift:
   ``cell * LN(out_w(h)) + LN(out_b(h))``. (``col_attention_type="standard"`` swaps ``tf_col`` for
   TabICL's induced-point set transformer.)
2. Row interaction (``bi_axial_attention``). Within each row, the ``H + row_num_cls`` cell tokens go
   through ``row_num_blocks`` bi-axial blocks; each applies full cross-feature attention, attention
   within 4 contiguous feature groups, attention of each half of the features to the other half and
   relational attention, then ``row_num_cls`` learned CLS tokens attend to the result. A block returns
   only its CLS tokens, so every block after the first sees those tokens alone. The last block's CLS
   tokens, flattened, are the row's representation (``row_num_cls * E`` wide).
3. In-context learning (``icl_predictor``): TabICL's ICL transformer, taken from the ``tabicl``
   package. Training rows get their label embedding added; every row attends to the training rows
   only; a 2-layer decoder gives ``max_classes`` logits.

Checkpoints. The official file ``Orion-BiX-v1.1.ckpt`` (Hugging Face ``Lexsi/Orion-BiX``) is TabICL's
container: a torch file holding ``{"config": constructor kwargs, "state_dict": ...}``, read with
``weights_only=True``. As the reference loader does, ``_orig_mod.`` and ``module.`` key prefixes
(from ``torch.compile`` and DataParallel) are stripped and config keys that the constructor does not
know are accepted and ignored (they are also dropped from the saved architecture). Loading is strict:
a missing or unexpected key is an error naming it. The state dict mirrors the reference key for key,
including ``bi_axial_attention.out_ln``, which the reference creates but never applies; we keep it
for the same keys and do not apply it either. Supported variants are the ones the reference can run
and the release uses: ``row_attention_type="bi_axial"``, ``icl_attention_type="standard"``,
``col_attention_type`` ``"linear"`` (feature map ``"elu"`` or ``"identity"``) or ``"standard"``; any other
value is refused when the module is built. ``col_num_inds`` only matters for the ``"standard"`` column
stage, and ``row_rope_base``/``row_feature_map``/``icl_feature_map``/``debug`` are accepted and unused,
as in the reference.

Two reference quirks we keep on purpose, because the released weights were trained with them: the
linear attention multiplies the queries by the *transpose* of the summed key-value product
(``einsum("nlhd,nhmd,nlh->nlhm")`` over a ``(d, m)`` product), and the padded reserved columns are
embedded like any other column (``-100 * ln_w.bias + ln_b.bias``) and take part in row attention.
Where the reference crashes we do the limit of what it computes: with fewer than 4 tokens in a row
(``row_num_cls < 4`` from the second block on) its grouped attention fails on empty groups; ours
leaves those tokens unchanged, as the reference's own code would with empty groups.

Forward. ``OrionBix(X, y_train)`` takes ``X`` (tables, rows, features) with the training rows first.
In train mode it returns the test rows' ``max_classes`` logits (the reference's training forward). In
eval mode it returns what the reference's default eval forward returns (``return_logits=True``, so
``softmax_temperature`` plays no part): the test rows' logits for the ``len(unique(y_train[0]))``
classes present. Past ``max_classes`` classes it builds the reference's class hierarchy (TabICL's tree:
at most ``max_classes`` groups per node; each node's softmax at the reference's fixed 0.9, since it
never passes its temperature down; probabilities chained) and returns
``softmax_temperature * log(p + 1e-6)``. On CPU the outputs are bit-identical to the reference's
(tests/parity), including ``predict_proba`` of its sklearn wrapper with one member.

LoRA. Every projection under the default prefixes runs through its own ``forward``: the linear
attention's ``query/key/value/out_projection``, the feed-forward and group/hier/rel projections, the
CLS attention's FFN and the decoder are plain ``nn.Linear`` modules. Each softmax attention keeps q/k/v
in one packed ``in_proj_weight``, which peft adapts as a ``target_parameters`` entry, and calls its
``out_proj`` as a module: the bi-axial, ICL and induced-point blocks use TabICL's attention made live
(``tabicl.LiveOutProjAttention``); the CLS attention, a plain ``nn.MultiheadAttention`` in the
reference, is :class:`LiveTorchAttention` (torch's kernel, then ``out_proj``). Default targets:
``col_embedder.tf_col``, ``bi_axial_attention`` (the competitor's ``biaxial`` never matched it),
``icl_predictor.tf_icl`` and ``icl_predictor.decoder``.

Inference (``OrionBixAdapter.predict``) is the reference wrapper ``OrionBixClassifier``'s at its defaults
(``orion_members``): the context labels encoded to the classes present, the wrapper's 32 members (Latin-square
feature orders, cyclic class shifts drawn from seed 42, half of them on Yeo-Johnson power-transformed
features, each with its standard scaling and outlier clipping fitted on the context), each member's logits
un-shifted, averaged (``average_logits=True``), then a softmax at ``softmax_temperature`` (0.9). The numbers
reach the members as the user gave them (``raw_numbers``). Training runs each episode through the same
members (``episode_logits``). Deviations: each member is its own forward (the reference batches members and
reuses the first table's column embeddings, a path that fails for more than one table in tabtune 0.2.1);
a gap is filled (the reference refuses it). Past ``max_classes`` classes the temperature cancels out, as in
the reference: the result is the normalised geometric mean of the members' hierarchy probabilities.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tabicl._model.encoders import SetTransformer
from tabicl._model.layers import ClassNode, MultiheadAttentionBlock, SkippableLinear
from tabicl._model.learning import ICLearning
from torch import Tensor, nn

from ..config import ModelConfig, StrategyConfig
from ..errors import TabTuneError
from . import orion_members
from .base import ModelAdapter, Task, load_weights
from .specs.orion_bix import CHECKPOINTS, OrionBixConfig, OrionBixSpec  # noqa: F401 (OrionBixConfig: re-exported)
from .tabicl import PLAIN_LINEAR, _make_attention_live, read_container, write_container

# members a forward: the reference wrapper's batched path (its default batch_size=8) fails in tabtune 0.2.1,
# so its working computation is one member a forward, each in its own feature order
WRAPPER_BATCH = 1

SKIP_VALUE = -100.0
NUM_GROUPS = 4  # the reference's grouped attention always uses 4 contiguous feature groups
HIERARCHY_TEMPERATURE = 0.9  # the reference's tree leaves always use its default temperature


def _activation(activation):
    return getattr(F, activation) if isinstance(activation, str) else activation


# -- column embedding ----------------------------------------------------------------------------


class LinearAttention(nn.Module):
    """Multi-head linear attention: ``phi(Q) (phi(K)^T V)``, normalised by ``phi(Q) sum(phi(K))``."""

    def __init__(self, d_model: int, nhead: int, feature_map: str = "elu", eps: float = 1e-6):
        super().__init__()
        self.nhead, self.eps = nhead, eps
        self.feature_map = feature_map
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)

    def _phi(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1 if self.feature_map == "elu" else x

    def forward(self, queries: Tensor, keys: Tensor) -> Tensor:
        """Return the attention output (..., L, d_model) of ``queries`` over ``keys`` (also the values)."""
        *batch, L, _ = queries.shape
        S = keys.shape[-2]
        q = self.query_projection(queries).reshape(-1, L, self.nhead, queries.shape[-1] // self.nhead)
        k = self.key_projection(keys).reshape(-1, S, self.nhead, q.shape[-1])
        v = self.value_projection(keys).reshape(-1, S, self.nhead, q.shape[-1])
        Q, K = self._phi(q), self._phi(k)
        KV = torch.einsum("nshd,nshm->nhdm", K, v)
        Z = 1 / (torch.einsum("nlhd,nhd->nlh", Q, K.sum(dim=1)) + self.eps)
        # the reference contracts the queries with the transposed KV product (see the module docstring)
        out = torch.einsum("nlhd,nhmd,nlh->nlhm", Q, KV, Z)
        return self.out_projection(out.reshape(*batch, L, -1))


class LinearEncoderLayer(nn.Module):
    """Post-norm linear-attention layer: returns (..., rows, d_model); rows past ``train_size`` read the rows before."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation, feature_map: str):
        super().__init__()
        self.attention = LinearAttention(d_model, nhead, feature_map)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _activation(activation)

    def forward(self, x: Tensor, train_size: int | None) -> Tensor:
        if train_size is None:
            attn = self.attention(x, x)
        else:
            # training rows and the rest in two calls over the same keys, as the reference does: the
            # results are the same either way, and bit-identical only this way
            train = x[..., :train_size, :]
            parts = [self.attention(train, train)]
            if train_size < x.shape[-2]:
                parts.append(self.attention(x[..., train_size:, :], train))
            attn = torch.cat(parts, dim=-2)
        x = self.norm1(x + self.dropout(attn))
        y = self.dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return self.norm2(x + y)


class LinearAttentionBlock(nn.Module):
    """A column-attention block: returns the encoded cells; all-skip-value columns (the reserved CLS slots) stay so."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, feature_map):
        super().__init__()
        self.transformer_layer = LinearEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, feature_map)

    def forward(self, src: Tensor, train_size: int | None = None) -> Tensor:
        skip = (src == SKIP_VALUE).all(dim=(-2, -1))
        if not skip.any():
            return self.transformer_layer(src, train_size)
        out = torch.full_like(src, SKIP_VALUE)
        if not skip.all():
            out[~skip] = self.transformer_layer(src[~skip], train_size)
        return out


class LinearSetEncoder(nn.Module):
    """``tf_col`` of linear-attention blocks: returns the column cells re-encoded, (..., rows, E)."""

    def __init__(self, num_blocks, d_model, nhead, dim_feedforward, dropout, activation, feature_map):
        super().__init__()
        self.blocks = nn.ModuleList([LinearAttentionBlock(d_model, nhead, dim_feedforward, dropout, activation,
                                                          feature_map) for _ in range(num_blocks)])

    def forward(self, src: Tensor, train_size: int | None = None) -> Tensor:
        for block in self.blocks:
            src = block(src, train_size)
        return src


class ColumnEmbedder(nn.Module):
    """Per-cell embeddings (B, T, row_num_cls + H, E), each column encoded as a set of its cells."""

    def __init__(self, embed_dim, num_blocks, nhead, dim_feedforward, num_inds, dropout, activation, norm_first,
                 reserve_cls_tokens, attention_type, feature_map):
        super().__init__()
        self.reserve_cls_tokens = reserve_cls_tokens
        self.in_linear = SkippableLinear(1, embed_dim)
        if attention_type == "linear":
            self.tf_col = LinearSetEncoder(num_blocks, embed_dim, nhead, dim_feedforward, dropout, activation,
                                           feature_map)
        else:  # TabICL's induced-point set transformer, as the reference's "standard" column stage
            self.tf_col = SetTransformer(num_blocks=num_blocks, d_model=embed_dim, nhead=nhead,
                                         dim_feedforward=dim_feedforward, num_inds=num_inds, dropout=dropout,
                                         activation=activation, norm_first=norm_first)
        self.out_w = SkippableLinear(embed_dim, embed_dim)
        self.ln_w = nn.LayerNorm(embed_dim) if norm_first else nn.Identity()
        self.out_b = SkippableLinear(embed_dim, embed_dim)
        self.ln_b = nn.LayerNorm(embed_dim) if norm_first else nn.Identity()

    def forward(self, X: Tensor, train_size: int) -> Tensor:
        X = F.pad(X, (self.reserve_cls_tokens, 0), value=SKIP_VALUE)
        cells = X.transpose(1, 2).unsqueeze(-1)  # (B, columns, T, 1)
        hidden = self.tf_col(self.in_linear(cells), train_size)
        embeddings = cells * self.ln_w(self.out_w(hidden)) + self.ln_b(self.out_b(hidden))
        return embeddings.transpose(1, 2)


# -- bi-axial row attention ----------------------------------------------------------------------


def _attention_block(embed_dim, nhead, dim_feedforward, dropout, activation, norm_first) -> MultiheadAttentionBlock:
    return MultiheadAttentionBlock(embed_dim, nhead, dim_feedforward, dropout, activation, norm_first)


class StandardCrossFeatureAttention(nn.Module):
    """Every feature token attends to every other; returns (rows, features, E)."""

    def __init__(self, *block_args):
        super().__init__()
        self.attention = _attention_block(*block_args)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x, x, x)


class GroupedFeatureAttention(nn.Module):
    """Attention within 4 contiguous feature groups; features past the last full group are left as they are."""

    def __init__(self, *block_args):
        super().__init__()
        embed_dim, norm_first = block_args[0], block_args[-1]
        self.attention = _attention_block(*block_args)
        self.group_proj = nn.Linear(embed_dim, embed_dim)
        self.group_ln = nn.LayerNorm(embed_dim) if norm_first else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        rows, n_features, embed_dim = x.shape
        per_group = n_features // NUM_GROUPS
        if per_group == 0:  # the reference fails on the empty groups; what its code means is x unchanged
            return x
        grouped_width = per_group * NUM_GROUPS
        groups = self.group_ln(self.group_proj(x[:, :grouped_width].reshape(rows, NUM_GROUPS, per_group, embed_dim)))
        groups = self.attention(groups, groups, groups).reshape(rows, grouped_width, embed_dim)
        return torch.cat([groups, x[:, grouped_width:]], dim=1) if grouped_width < n_features else groups


class HierarchicalFeatureAttention(nn.Module):
    """The first half of the features attends to the second, then the second to the updated first."""

    def __init__(self, *block_args):
        super().__init__()
        embed_dim, norm_first = block_args[0], block_args[-1]
        self.attention = _attention_block(*block_args)
        self.hier_proj = nn.Linear(embed_dim, embed_dim)
        self.hier_ln = nn.LayerNorm(embed_dim) if norm_first else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        mid = x.shape[1] // 2
        first, second = x[:, :mid], x[:, mid:]
        first = self.attention(self.hier_ln(self.hier_proj(first)), second, second)
        second = self.attention(self.hier_ln(self.hier_proj(second)), first, first)
        return torch.cat([first, second], dim=1)


class RelationalFeatureAttention(nn.Module):
    """Self-attention over projected feature tokens; returns (rows, features, E)."""

    def __init__(self, *block_args):
        super().__init__()
        embed_dim, norm_first = block_args[0], block_args[-1]
        self.attention = _attention_block(*block_args)
        self.rel_proj = nn.Linear(embed_dim, embed_dim)
        self.rel_ln = nn.LayerNorm(embed_dim) if norm_first else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.rel_ln(self.rel_proj(x))
        return self.attention(x, x, x)


class LiveTorchAttention(nn.MultiheadAttention):
    """torch's batch-first attention, computed as ``nn.MultiheadAttention`` does, with ``out_proj`` called as a module.

    The reference's CLS attention is a plain ``nn.MultiheadAttention``; its forward reads
    ``out_proj.weight`` directly, so a LoRA on ``out_proj`` would never run. We run torch's own kernel with
    an identity output projection (exact) and then call ``out_proj``: same parameters, same arithmetic.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__(embed_dim, num_heads, dropout, batch_first=True)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Return the attention output (batch, tgt_len, embed_dim)."""
        key_t = key.transpose(0, 1)
        value_t = key_t if value is key else value.transpose(0, 1)  # torch packs k/v when they are one tensor
        identity = torch.eye(self.embed_dim, dtype=query.dtype, device=query.device)
        out, _ = F.multi_head_attention_forward(
            query.transpose(0, 1), key_t, value_t, self.embed_dim, self.num_heads, self.in_proj_weight,
            self.in_proj_bias, None, None, False, self.dropout, identity, None, training=self.training,
            need_weights=True)  # need_weights selects the kernel nn.MultiheadAttention runs by default
        return self.out_proj(out).transpose(0, 1)


class CLSAttention(nn.Module):
    """The updated CLS tokens (rows, num_cls, E) after they attend to the feature tokens, with a feed-forward."""

    def __init__(self, embed_dim, nhead, dim_feedforward, dropout, activation, norm_first):
        super().__init__()
        self.norm_first = norm_first
        self.attn = LiveTorchAttention(embed_dim, nhead, dropout)
        self.norm1 = nn.LayerNorm(embed_dim) if norm_first else nn.Identity()
        self.norm2 = nn.LayerNorm(embed_dim) if norm_first else nn.Identity()
        self.ffn = nn.Sequential(nn.Linear(embed_dim, dim_feedforward),
                                 nn.GELU() if activation == "gelu" else nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(dim_feedforward, embed_dim), nn.Dropout(dropout))
        self.dropout = nn.Dropout(dropout)

    def forward(self, cls_tokens: Tensor, features: Tensor) -> Tensor:
        if self.norm_first:
            features = self.norm1(features)
            cls_tokens = cls_tokens + self.dropout(self.attn(self.norm1(cls_tokens), features, features))
            return cls_tokens + self.dropout(self.ffn(self.norm2(cls_tokens)))
        cls_tokens = self.norm1(cls_tokens + self.dropout(self.attn(cls_tokens, features, features)))
        return self.norm2(cls_tokens + self.dropout(self.ffn(cls_tokens)))


class BiAxialAttentionBlock(nn.Module):
    """One bi-axial block: four attention patterns over the feature tokens; returns only the CLS tokens."""

    def __init__(self, embed_dim, nhead, dim_feedforward, num_cls, dropout, activation, norm_first):
        super().__init__()
        block_args = (embed_dim, nhead, dim_feedforward, dropout, activation, norm_first)
        self.standard_attention = StandardCrossFeatureAttention(*block_args)
        self.grouped_attention = GroupedFeatureAttention(*block_args)
        self.hierarchical_attention = HierarchicalFeatureAttention(*block_args)
        self.relational_attention = RelationalFeatureAttention(*block_args)
        self.cls_tokens = nn.Parameter(torch.empty(num_cls, embed_dim))
        nn.init.trunc_normal_(self.cls_tokens, std=0.02)
        self.cls_attention = CLSAttention(*block_args)

    def forward(self, x: Tensor) -> Tensor:
        x = self.standard_attention(x)
        x = self.grouped_attention(x)
        x = self.hierarchical_attention(x)
        x = self.relational_attention(x)
        return self.cls_attention(self.cls_tokens.expand(x.shape[0], -1, -1), x)


class BiAxialAttention(nn.Module):
    """Row representations (B, T, num_cls * E) from the cell embeddings (B, T, features, E)."""

    def __init__(self, embed_dim, num_blocks, nhead, dim_feedforward, num_cls, dropout, activation, norm_first):
        super().__init__()
        self.num_cls = num_cls
        self.bi_axial_blocks = nn.ModuleList([
            BiAxialAttentionBlock(embed_dim, nhead, dim_feedforward, num_cls, dropout, activation, norm_first)
            for _ in range(num_blocks)])
        # kept for the checkpoint's keys: the reference creates this norm but never applies it
        self.out_ln = nn.LayerNorm(embed_dim) if norm_first else nn.Identity()

    def forward(self, embeddings: Tensor) -> Tensor:
        B, T, n_features, E = embeddings.shape
        x = embeddings.reshape(B * T, n_features, E)
        for block in self.bi_axial_blocks:
            x = block(x)
        return x.reshape(B, T, self.num_cls * E)


# -- the model -----------------------------------------------------------------------------------


class OrionBix(nn.Module):
    """OrionBix with the reference's constructor; unknown keyword arguments are accepted and ignored, as there."""

    def __init__(self, max_classes: int = 10, embed_dim: int = 128, col_num_blocks: int = 3, col_nhead: int = 4,
                 col_num_inds: int = 128, col_attention_type: str = "linear", col_feature_map: str = "elu",
                 row_num_blocks: int = 3, row_nhead: int = 8, row_num_cls: int = 4, row_rope_base: float = 100000,
                 row_attention_type: str = "bi_axial", row_feature_map: str = "elu", icl_num_blocks: int = 12,
                 icl_nhead: int = 4, icl_attention_type: str = "standard", icl_feature_map: str = "elu",
                 ff_factor: int = 2, dropout: float = 0.0, activation: str = "gelu", norm_first: bool = True,
                 debug: bool = False, **ignored):
        super().__init__()
        for key, value, allowed in (("col_attention_type", col_attention_type, ("linear", "standard")),
                                    ("row_attention_type", row_attention_type, ("bi_axial",)),
                                    ("icl_attention_type", icl_attention_type, ("standard",))):
            if value not in allowed:
                raise TabTuneError(f"OrionBix {key}={value!r} is not supported (supported: {', '.join(allowed)})")
        if col_attention_type == "linear" and col_feature_map not in ("elu", "identity"):
            # the reference's "hedgehog" map fails in its forward (an unbound name), so no checkpoint uses it
            raise TabTuneError(f"OrionBix col_feature_map={col_feature_map!r} is not supported "
                               f"(supported: elu, identity)")
        self.max_classes = max_classes
        self.col_embedder = ColumnEmbedder(embed_dim, col_num_blocks, col_nhead, embed_dim * ff_factor, col_num_inds,
                                           dropout, activation, norm_first, row_num_cls, col_attention_type,
                                           col_feature_map)
        self.bi_axial_attention = BiAxialAttention(embed_dim, row_num_blocks, row_nhead, embed_dim * ff_factor,
                                                   row_num_cls, dropout, activation, norm_first)
        icl_dim = embed_dim * row_num_cls
        self.icl_predictor = ICLearning(max_classes=max_classes, out_dim=max_classes, d_model=icl_dim,
                                        num_blocks=icl_num_blocks, nhead=icl_nhead, dim_feedforward=icl_dim * ff_factor,
                                        dropout=dropout, activation=activation, norm_first=norm_first)

    def forward(self, X: Tensor, y_train: Tensor, softmax_temperature: float = 0.9) -> Tensor:
        """Logits of the rows after the ``y_train.shape[1]`` training rows of each table in ``X`` (B, T, H).

        Train mode: (B, test rows, max_classes). Eval mode: (B, test rows, classes present in
        ``y_train``), as the reference's eval forward with its defaults; past ``max_classes``
        classes, ``softmax_temperature * log(p + 1e-6)`` of the class hierarchy's probabilities.
        """
        train_size = y_train.shape[1]
        R = self.bi_axial_attention(self.col_embedder(X, train_size))
        if self.training:
            return self.icl_predictor(R, y_train)
        n_classes = torch.unique(y_train[0]).numel()
        if any(torch.unique(labels).numel() != n_classes for labels in y_train):
            raise ValueError("OrionBix: every table in a batch must have the same number of classes")
        if n_classes <= self.max_classes:
            return self.icl_predictor._icl_predictions(R, y_train)[:, train_size:, :n_classes]
        probs = torch.stack([self._hierarchy_probs(r[:train_size], labels, r[train_size:])
                             for r, labels in zip(R, y_train)])
        return softmax_temperature * torch.log(probs + 1e-6)

    def _leaf_probs(self, R: Tensor, labels: Tensor, temperature: float) -> Tensor:
        train_size = labels.shape[0]
        n_classes = torch.unique(labels).numel()
        logits = self.icl_predictor._icl_predictions(R[None], labels[None])[0, train_size:, :n_classes]
        return torch.softmax(logits / temperature, dim=-1)

    def _hierarchy_probs(self, R_train: Tensor, y_train: Tensor, R_test: Tensor) -> Tensor:
        """Probabilities (test rows, classes) from the reference's tree of at most ``max_classes`` groups per node."""
        root = ClassNode(depth=0)
        self.icl_predictor._fit_node(root, R_train, y_train, current_depth=0)  # TabICL's tree, as the reference's
        n_classes = len(root.classes_)

        def node_probs(node: ClassNode) -> Tensor:
            R = torch.cat([node.R, R_test])
            out = R_test.new_zeros(len(R_test), n_classes)
            if node.is_leaf:
                local = self.icl_predictor._label_encoding(node.y)
                out[:, node.classes_.long()] = self._leaf_probs(R, local, HIERARCHY_TEMPERATURE)
                return out
            groups = self._leaf_probs(R, node.group_indices.to(R.device), HIERARCHY_TEMPERATURE)
            for g, child in enumerate(node.child_nodes):
                out = out + node_probs(child) * groups[:, g:g + 1]
            return out

        return node_probs(root)


CONSTRUCTOR_KEYS = tuple(name for name, p in inspect.signature(OrionBix.__init__).parameters.items()
                         if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)


# -- the adapter ---------------------------------------------------------------------------------


class OrionBixAdapter(OrionBixSpec, ModelAdapter):
    # -- building ------------------------------------------------------------------------------
    def build(self, config: ModelConfig, task: Task):
        if not config.pretrained:
            architecture = {**self.random_size(config), "max_classes": self.max_classes}
            return self.from_architecture(architecture), architecture
        path = self.checkpoint_file(config, task)
        architecture, state = read_container(path, self.title)
        architecture = {k: v for k, v in architecture.items() if k in CONSTRUCTOR_KEYS}
        module = self.from_architecture(architecture)
        load_weights(module, state, path)
        return module, architecture

    def from_architecture(self, architecture: dict) -> nn.Module:
        return _make_attention_live(OrionBix(**architecture))

    def write_checkpoint(self, module: nn.Module, architecture: dict, task: Task, path: Path) -> Path:
        """The TabICL-style container (``config`` + ``state_dict``) the OrionBix reference loader reads,
        under the official file name; the state-dict keys are the official ones."""
        return write_container(Path(path) / CHECKPOINTS[task.kind], architecture, module)

    # -- forward -------------------------------------------------------------------------------
    def episode_logits(self, module, X_context: Tensor, y_context: Tensor, X_query: Tensor, task: Task,
                       config=None) -> Tensor:
        """Each episode through the reference wrapper's members fitted on its context (``orion_members``), as
        ``predict`` sees it; ``config.n_estimators`` members (``strategy.train_n_estimators``)."""
        # no config (a caller outside the trainer): the trainer's members an episode, not prediction's 32
        config = config if config is not None else OrionBixConfig(n_estimators=StrategyConfig.train_n_estimators)
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
        temperature = config.softmax_temperature

        def forward(X, y):
            X = torch.as_tensor(X, device=device, dtype=torch.float32)[None]
            y = torch.as_tensor(y, device=device, dtype=torch.float32)[None]
            return module(X, y, softmax_temperature=temperature)[0].float().cpu().numpy()

        return orion_members.predicted_probabilities(forward, X_context, y_context, X_query, config.n_estimators,
                                                     WRAPPER_BATCH, temperature, task.n_classes)

    # -- LoRA ------------------------------------------------------------------------------------
    def lora_targets(self, module: nn.Module, prefixes):
        targets = self.modules_under(module, prefixes)
        # plain linear layers only: a LoRA beside a SkippableLinear or OneHotAndLinear would see the wrong input
        linears = [n for n, m in targets.items() if type(m) in PLAIN_LINEAR]
        packed = [f"{n}.in_proj_weight" for n, m in targets.items() if isinstance(m, nn.MultiheadAttention)]
        return linears, packed
