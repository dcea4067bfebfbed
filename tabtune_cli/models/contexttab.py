"""ContextTab (SAP's ConTextTab, later ``sap-rpt-1-oss``): the network, in tabtune's own code.

The architecture. Every cell of the table, the target column included, is one token:
``column_remapping`` of its column name's sentence embedding, plus ``content_remapping``
of its text (text columns; a zero vector elsewhere, so the layer's bias is in every
token), plus ``number_embeddings`` of its standardised value (numeric cells only), plus
the sum of four date embeddings (year, month, day, weekday; index 0 where the cell is no
date, so that sum is in every token too). The target column's token adds the label:
``target_embedding_layer_classif`` of class id + 1 (index 0 for a query row), or
``target_embedding_layer_reg`` of the standardised target (nothing for a query row). Then
LayerNorm (eps 1e-5) and dropout. Each of the ``n_layers`` layers is two post-LN
(RoBERTa-style) transformer layers: attention across the columns of each row, then
attention across the rows of each column, in which every row sees the context rows and
itself, so no query row ever sees another query row and no context row sees a query.
Heads are 64 wide (``hidden_size // 64`` of them), the feed-forward is ``4 * hidden_size``
with exact GELU, dropout is 0.1 (attention probabilities included). The heads read the
target column's token of each query row: ``dense_classif`` + GELU + ``output_head_classif``
(64 logits: class ids 0..61, id 62 for every rarer class, 63 unused), or ``dense_reg`` +
GELU + ``output_head_reg`` (one standardised value).

Regression. The reference can also bin the target and the numbers into 64 quantile
buckets (``regression_type="reg-as-classif"``; ``number_embeddings`` and
``target_embedding_layer_reg`` are then ``nn.Embedding(64, hidden)`` and
``output_head_reg`` has 64 outputs). The official checkpoints (``SAP/contexttab``
``l2/base.pt`` and ``SAP/sap-rpt-1-oss``) are read by the reference's estimators as ``"l2"``:
direct regression, numbers through ``Linear(1, hidden)`` (``l2/base.pt``'s 64,580,423 bytes
match one l2 base layer in fp32; a binned file would be about 0.57 MB larger). Only ``"l2"`` is built here; a binned checkpoint is refused by name.
The reference's "clustering" classification heads (``cluster_dense``, ``cluster_output_head``:
query-context similarities, the best per class) are not in the official checkpoints and are not
built either; a file holding them is refused by name. Their target token is each context row's
class *name* through ``target_content_remapping``, which tabtune's class ids do not carry.

Releases. ``model.release`` picks the official file: ``contexttab`` (``SAP/contexttab``,
``l2/base.pt``) or ``sap-rpt-1-oss`` (``SAP/sap-rpt-1-oss``, ``2025-11-04_sap-rpt-one-oss.pt``).
They share one layout: SAP's ``sap_rpt_oss`` estimator (github.com/SAP-samples/sap-rpt-1-oss,
``sap_rpt_oss/rpt.py``) builds ``RPT(ModelSize.base, regression_type="l2",
classification_type="cross-entropy")``, ConTextTab's module renamed, and loads the file strictly
through the same ``load_weights``; its README says "the model checkpoint and functionality remain
identical". Its estimator defaults to 8 bags of 8,192 context rows where the training table is
larger (ConTextTab's to one); tabtune predicts from one context of ``max_context_rows`` for either.

Checkpoints. The official file is a raw ``torch.save(state_dict)`` (read with
``weights_only=True``; a ``module.`` key prefix is stripped) holding the encoder weights of
one layer only: the reference loader copies the highest-numbered
``in_context_encoder.N.*`` into every lower index (for the base size, N = 11 into 0..10),
so all layers start equal. (Given a file holding index 0 only, that loader copies nothing,
fails the strict load and retries itself without end; the official files, which it reads,
hold the last index.) :func:`load_contexttab_state` shares a file's one layer,
whatever its index, across every layer of the module; a file holding every layer loads
strictly, as it is (the reference's loader would overwrite the lower layers with the last
one even then). Keys and shapes equal the reference's, key for key. The file names no size:
:func:`file_architecture` reads it as the reference's loader does (the highest layer index is
the last layer, the width is the LayerNorm's, heads are 64 wide), so ``model.checkpoint`` takes
any size, and :meth:`ContextTabAdapter.write_checkpoint` writes a module back in this format.

LoRA. Every projection (the attention's ``query``/``key``/``value``, each ``dense``,
the embeddings' remappings and number/target layers, the heads) is an ``nn.Linear``, and
the label and date tables are ``nn.Embedding``; all are called as modules, so Hugging Face
peft adapters on any of them are live.

The adapter. :class:`ContextTabTable` is this model's preprocessor: it keeps numbers, date parts
and every other column as text (ids into a vocabulary of the table's strings), and the column
names. :class:`ContextTabAdapter` turns its matrices into the tensors above: text cells and names
through the in-process sentence encoder (``tabtune_cli.data.text``; each distinct string embedded
once), numbers standardised by each context as the reference does. Prediction follows the
reference's estimator at its defaults (``ConTextTabClassifier()``): one pass, every training row as
context up to 8,192 and past it the estimator's own draw (``DataFrame.sample(8192, random_state=42)``,
:meth:`ContextTabAdapter.prediction_context`), the context's classes under the estimator's class ids
(:func:`reference_class_order`), a plain softmax over those classes (a class the context lacks gets no
probability), queries in chunks. With nothing but ``model.checkpoint`` its probabilities are the
estimator's (``tests/parity/test_contexttab_defaults_parity.py``: 7e-7 on 3,000 and 9,000 raw training rows).
Where tabtune reads a table differently, the estimator is the odd one: it drops a column constant in the
training rows only if it is constant in the query chunk too (so a query's answer depends on the other
queries of its chunk; tabtune drops it), embeds a missing text cell as ``"None"`` or ``"<NA>"`` by its
container (tabtune: ``"nan"`` always), reads nullable ``Int64`` / ``Float64`` columns as text, and orders
classes with tied counts by an unstable sort (tabtune: the one seen first in the context). Like the estimator,
tabtune takes dates from date dtypes only: a column of date strings (as a CSV gives them) is text, embedded
as the sentence encoder reads it. Fine-tuning episodes keep the column layout (no feature shuffling: the model reads each
column's name) and the model's context mask.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import rundir
from ..config import ModelConfig
from ..data.text import TextEncoder, shared_encoder
from ..errors import TabTuneError
from .base import ModelAdapter, Task, class_shift_probs, load_weights
from .specs.contexttab import MAX_CLASSES, MAX_COLUMNS, RELEASES, SIZES, ContextTabConfig, ContextTabSpec

TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence embeddings
N_LABELS = 64  # rows of the label table and outputs of the classification head
HEAD_DIM = 64
LAYER_NORM_EPS = 1e-5
DROPOUT = 0.1
# year 2000..2050, month, day, weekday; each shifted by one so that 0 means "no date"
DATE_TABLES = {"year_embeddings": 52, "month_embeddings": 13, "day_embeddings": 32, "weekday_embeddings": 8}


class SelfAttention(nn.Module):
    """(batch, seq, hidden) -> (batch, seq, hidden), heads concatenated; ``mask`` (seq, seq) True = may attend."""

    def __init__(self, hidden_size: int, n_heads: int, dropout: float):
        super().__init__()
        if hidden_size % n_heads:
            raise TabTuneError(f"ContextTab: hidden size {hidden_size} is not a multiple of {n_heads} heads")
        self.n_heads, self.dropout = n_heads, dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                             attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).flatten(-2)


class AddNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: the post-LN step that closes each sub-layer."""

    def __init__(self, d_in: int, hidden_size: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)  # the official key name
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, n_heads: int, dropout: float):
        super().__init__()
        self.self_attention = SelfAttention(hidden_size, n_heads, dropout)
        self.output = AddNorm(hidden_size, hidden_size, dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.output(self.self_attention(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, 4 * hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class TransformerLayer(nn.Module):
    """One post-LN transformer layer over (batch, seq, hidden): attention, then the feed-forward."""

    def __init__(self, hidden_size: int, n_heads: int, dropout: float):
        super().__init__()
        self.attention = Attention(hidden_size, n_heads, dropout)
        self.intermediate = Intermediate(hidden_size)
        self.output = AddNorm(4 * hidden_size, hidden_size, dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        attended = self.attention(x, mask)
        return self.output(self.intermediate(attended), attended)


def in_chunks(layer: TransformerLayer, x: Tensor, mask: Tensor | None, max_tokens: int | None) -> Tensor:
    """``layer(x, mask)``, computed over slices of the batch holding at most ``max_tokens`` tokens each.

    The batch elements are independent, so the result is the unsliced one; slicing only bounds the
    memory of the attention scores and the feed-forward activations."""
    per_chunk = len(x) if max_tokens is None else max(1, max_tokens // max(1, x.shape[1]))
    if per_chunk >= len(x):
        return layer(x, mask)
    return torch.cat([layer(x[start:start + per_chunk], mask) for start in range(0, len(x), per_chunk)])


class EncoderLayer(nn.Module):
    """(rows, columns, hidden) -> same: attention across each row's columns, then across each column's rows."""

    def __init__(self, hidden_size: int, n_heads: int, dropout: float):
        super().__init__()
        self.cross_column_layer = TransformerLayer(hidden_size, n_heads, dropout)
        self.cross_row_layer = TransformerLayer(hidden_size, n_heads, dropout)

    def forward(self, cells: Tensor, row_mask: Tensor, max_tokens: int | None = None) -> Tensor:
        cells = in_chunks(self.cross_column_layer, cells, None, max_tokens)  # rows are the batch
        by_column = in_chunks(self.cross_row_layer, cells.transpose(0, 1), row_mask, max_tokens)
        return by_column.transpose(0, 1)


class DateEmbeddings(nn.Module):
    """(rows, columns, 4) date parts -> (rows, columns, hidden): the sum of the four parts' embeddings."""

    def __init__(self, hidden_size: int):
        super().__init__()
        for name, size in DATE_TABLES.items():
            setattr(self, name, nn.Embedding(size, hidden_size))

    def forward(self, dates: Tensor) -> Tensor:
        return sum(getattr(self, name)(dates[..., i]) for i, name in enumerate(DATE_TABLES))


class CellEmbeddings(nn.Module):
    """The (rows, features + 1, hidden) input tokens; the target column is the last. See :meth:`ConTextTab.forward`."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.number_embeddings = nn.Linear(1, hidden_size)
        self.target_embedding_layer_reg = nn.Linear(1, hidden_size)
        self.target_embedding_layer_classif = nn.Embedding(N_LABELS, hidden_size)
        self.date_embeddings = DateEmbeddings(hidden_size)
        self.column_remapping = nn.Linear(TEXT_DIM, hidden_size)
        self.content_remapping = nn.Linear(TEXT_DIM, hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, column_names: Tensor, text: Tensor, numbers: Tensor, has_number: Tensor, dates: Tensor,
                y_context: Tensor, regression: bool) -> Tensor:
        dtype = self.layer_norm.weight.dtype
        n_rows, n_context = text.shape[0], y_context.shape[0]
        # the target column: no text, no number and no date of its own; its label is added below
        text = F.pad(text.to(dtype), (0, 0, 0, 1))
        numbers = F.pad(numbers.to(dtype), (0, 1))
        has_number = F.pad(has_number.bool(), (0, 1), value=False)
        dates = F.pad(dates.long(), (0, 0, 0, 1))

        number_tokens = self.number_embeddings(numbers.unsqueeze(-1))
        cells = (self.column_remapping(column_names.to(dtype)).unsqueeze(0) + self.content_remapping(text)
                 + torch.where(has_number.unsqueeze(-1), number_tokens, torch.zeros_like(number_tokens))
                 + self.date_embeddings(dates))

        n_query = n_rows - n_context
        if regression:
            context = self.target_embedding_layer_reg(y_context.to(dtype).unsqueeze(-1))
            label = torch.cat([context, context.new_zeros(n_query, context.shape[-1])])
        else:
            ids = torch.cat([y_context.long() + 1, y_context.new_zeros(n_query, dtype=torch.long)])
            label = self.target_embedding_layer_classif(ids)
        cells = torch.cat([cells[:, :-1], cells[:, -1:] + label.unsqueeze(1)], dim=1)
        return self.dropout(self.layer_norm(cells))


class ConTextTab(nn.Module):
    """ContextTab with the official state-dict keys; ``forward`` gives the query rows' outputs."""

    def __init__(self, n_layers: int, hidden_size: int, n_heads: int | None = None, dropout: float = DROPOUT):
        super().__init__()
        n_heads = n_heads or hidden_size // HEAD_DIM
        if n_layers < 1 or n_heads < 1:
            raise TabTuneError(f"ContextTab: needs at least one layer and one head (got {n_layers} layers, "
                               f"hidden size {hidden_size}, {n_heads} heads)")
        self.n_layers, self.hidden_size, self.n_heads = n_layers, hidden_size, n_heads
        # The reference splits rows and columns into slices to bound memory; so does this, when set.
        # An attribute, not a constructor argument: it changes no weight and no output.
        self.max_tokens_per_chunk: int | None = None
        self.dense_classif = nn.Linear(hidden_size, hidden_size)
        self.output_head_classif = nn.Linear(hidden_size, N_LABELS)
        self.dense_reg = nn.Linear(hidden_size, hidden_size)
        self.output_head_reg = nn.Linear(hidden_size, 1)
        self.embeddings = CellEmbeddings(hidden_size, dropout)
        self.in_context_encoder = nn.ModuleList(EncoderLayer(hidden_size, n_heads, dropout) for _ in range(n_layers))

    @classmethod
    def from_size(cls, size: str, **kwargs) -> ConTextTab:
        """A randomly initialised module of one of the reference's named sizes (``base`` is the official one)."""
        if size not in SIZES:
            raise TabTuneError(f"ContextTab: unknown size {size!r} (known: {', '.join(SIZES)})")
        n_layers, hidden_size = SIZES[size]
        return cls(n_layers, hidden_size, **kwargs)

    @staticmethod
    def row_attention_mask(n_rows: int, n_context: int, device=None) -> Tensor:
        """(rows, rows) bool, True where row i may attend to row j: j is a context row, or j is i."""
        rows = torch.arange(n_rows, device=device)
        return (rows.unsqueeze(0) < n_context) | (rows.unsqueeze(0) == rows.unsqueeze(1))

    def forward(self, column_names: Tensor, text: Tensor, numbers: Tensor, has_number: Tensor, dates: Tensor,
                y_context: Tensor, *, regression: bool = False, n_classes: int | None = None) -> Tensor:
        """The query rows' class logits (n_query, n_classes or 64), or standardised values (n_query,).

        One table per call; its rows are the context rows first, then the query rows. With
        F feature columns, R rows and C = ``len(y_context)`` context rows (E = 384):

        - ``column_names`` (F + 1, E): sentence embedding of each feature column's name, then
          of the target column's name (the reference's ``column_embeddings``).
        - ``text`` (R, F, E): sentence embedding of each text cell, zeros in cells of numeric
          and date columns (``text_embeddings[:, :-1]``; any float dtype, the reference's is float16).
        - ``numbers`` (R, F) float: each numeric cell standardised by its column's context rows
          (the reference clips to the context's 0.5-99.5 percentiles, replaces a missing or
          infinite value by the context mean, then standardises); any value where ``has_number``
          is False (it is not read there).
        - ``has_number`` (R, F) bool: True on cells of numeric columns, whose number is embedded
          (the reference's ``number_normalized > -99``). A missing numeric value keeps True with
          its imputed value, as in the reference, whose numbers are never missing by then.
        - ``dates`` (R, F, 4) int: year - 2000 + 1 (years clipped to 2000..2050), month 1..12,
          day 1..31, weekday + 1 (Monday = 1); 0 in all four where the cell is no date or a
          missing one (``date_year_month_day_weekday[:, :-1]``).
        - ``y_context`` (C,): class ids 0..62 (classification; 62 = the reference's shared id
          for classes past the 62 most frequent), or the target standardised by the context
          rows (``regression=True``). Query rows have no label; the model marks them itself.
        - ``n_classes``: keep only the first ``n_classes`` logits (classification).
        """
        n_rows, n_features = text.shape[:2]
        n_context = y_context.shape[0]
        if column_names.shape[0] != n_features + 1:
            raise TabTuneError(f"ContextTab: {column_names.shape[0]} column names for {n_features} feature columns "
                               f"(the target column's name comes last, so {n_features + 1} are needed)")
        if not 0 < n_context <= n_rows:
            raise TabTuneError(f"ContextTab: {n_context} context labels for a table of {n_rows} rows")
        if not regression and (int(y_context.min()) < 0 or int(y_context.max()) > MAX_CLASSES):
            raise TabTuneError(f"ContextTab: class ids must lie in 0..{MAX_CLASSES}, got "
                               f"{int(y_context.min())}..{int(y_context.max())}")
        cells = self.embeddings(column_names, text, numbers, has_number, dates, y_context, regression)
        row_mask = self.row_attention_mask(n_rows, n_context, cells.device)
        for layer in self.in_context_encoder:
            if torch.is_grad_enabled() and self.training:  # recompute activations in backward, as the reference
                cells = checkpoint(layer, cells, row_mask, self.max_tokens_per_chunk, use_reentrant=False)
            else:
                cells = layer(cells, row_mask, self.max_tokens_per_chunk)
        target_tokens = cells[n_context:, -1]
        if regression:
            return self.output_head_reg(F.gelu(self.dense_reg(target_tokens)))[:, 0]
        logits = self.output_head_classif(F.gelu(self.dense_classif(target_tokens)))
        return logits if n_classes is None else logits[:, :n_classes]


# -- checkpoints -------------------------------------------------------------------------------------
LAYER_KEY = re.compile(r"^in_context_encoder\.(\d+)\.")


def share_single_layer(state: dict, n_layers: int) -> dict:
    """``state`` with its one encoder layer's tensors under every index 0..n_layers-1 (and its own index dropped)."""
    indices = {int(m.group(1)) for k in state if (m := LAYER_KEY.match(k))}
    if len(indices) != 1:
        raise ValueError(f"expected one encoder layer, found {sorted(indices)}")
    (source,) = indices
    prefix = f"in_context_encoder.{source}."
    shared = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for key, tensor in state.items():
        if key.startswith(prefix):
            for index in range(n_layers):
                # a clone per layer: fine-tuning moves the layers apart
                shared[f"in_context_encoder.{index}.{key[len(prefix):]}"] = tensor.clone()
    return shared


def load_contexttab_state(path, n_layers: int | None = None) -> tuple[dict, int]:
    """``(state dict, number of encoder layers the file holds)`` of an official-format ContextTab checkpoint.

    The file is a raw ``torch.save(state_dict)``; a ``module.`` key prefix is stripped. With
    ``n_layers``, a file holding a single encoder layer (as the official ones do) gives that
    layer to every one of the ``n_layers`` layers; a file holding several is returned as it is.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise TabTuneError(f"model.checkpoint: no such file {str(path)!r}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TabTuneError(f"{path}: not a ContextTab checkpoint ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise TabTuneError(f"{path}: not a ContextTab checkpoint (expected a state dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in raw.items()}
    head = state.get("output_head_reg.weight")
    if head is not None and head.shape[0] != 1:
        raise TabTuneError(f"{path}: a binned-regression ('reg-as-classif') ContextTab checkpoint "
                           f"(output_head_reg has {head.shape[0]} outputs); only the official 'l2' kind is supported")
    if "cluster_dense.weight" in state:
        raise TabTuneError(f"{path}: a 'clustering'-head ContextTab checkpoint (cluster_dense, cluster_output_head); "
                           f"only the official 'cross-entropy' head (dense_classif, output_head_classif) is supported")
    n_in_file = len({int(m.group(1)) for k in state if (m := LAYER_KEY.match(k))})
    if n_layers is not None and n_in_file == 1:
        state = share_single_layer(state, n_layers)
    return state, n_in_file


def file_architecture(state: dict, path) -> dict:
    """``n_layers``, ``hidden_size`` and ``n_heads`` (None: 64-wide heads) of a checkpoint's state dict.

    Read as the reference's loader reads a file: its highest-numbered encoder layer is the last one
    (the official one-layer files hold index 11, so 12 layers), the width is the embeddings' LayerNorm's."""
    indices = {int(m.group(1)) for k in state if (m := LAYER_KEY.match(k))}
    norm = state.get("embeddings.layer_norm.weight")
    if not indices or norm is None:
        missing = "in_context_encoder.0.*" if not indices else "embeddings.layer_norm.weight"
        raise TabTuneError(f"{path}: not a ContextTab checkpoint (no {missing!r})")
    hidden_size = int(norm.shape[0])
    if hidden_size % HEAD_DIM:
        raise TabTuneError(f"{path}: hidden size {hidden_size} is no multiple of {HEAD_DIM} (the format implies "
                           f"{HEAD_DIM}-wide attention heads)")
    return {"n_layers": max(indices) + 1, "hidden_size": hidden_size, "n_heads": None}


def load_contexttab(module: ConTextTab, path) -> ConTextTab:
    """``module`` with the checkpoint at ``path`` loaded strictly (a one-layer file shared across its layers)."""
    state, _ = load_contexttab_state(path, module.n_layers)
    return load_weights(module, state, path)


# -- the table as ContextTab reads it ----------------------------------------------------------------
MISSING_TEXT = "nan"  # what the reference embeds for a missing text cell (it embeds str(value))


class ContextTabTable:
    """A table as ContextTab reads it: numbers, date parts and text cells, with the column names.

    ``transform`` gives a float32 matrix the rest of tabtune handles like any other: one column per
    numeric column (raw values, NaN where missing: the adapter standardises by each context), four per
    date column (year - 2000 + 1 clipped to 2000..2050, month, day, weekday + 1; 0 where missing) and one
    per text column, holding each cell's index into ``state["vocabulary"]``. Every column that is neither
    numeric nor a date is text, categories included, as in the reference (it embeds every string).
    Columns constant or empty in the training rows are dropped. The whole state is JSON.

    The vocabulary holds the strings of the rows transformed until :meth:`freeze` (the pipeline's context:
    training and validation rows), and only those are saved. After it, a string the vocabulary lacks gets a
    transient id past its end (``transient``: the strings of the latest ``transform`` only), so predicting
    never grows the saved state, nor carries the text of rows it was never trained on.
    """

    def __init__(self, state: dict | None = None, text_columns: list | None = None):
        self.state, self.text_columns = state, text_columns
        self._index = {text: i for i, text in enumerate(state["vocabulary"])} if state else {}
        self.frozen = state is not None  # a saved state is final
        self.transient: list[str] = []
        self._transient_index: dict[str, int] = {}

    def fit(self, frame, y=None) -> "ContextTabTable":
        from ..data.preprocess import _json_value, declared_text_columns

        columns, dropped = [], {}
        declared = declared_text_columns(frame, self.text_columns)
        for name in frame.columns:
            col = frame[name]
            if col.dropna().astype(str).nunique() <= 1:
                dropped[str(name)] = "constant"
                continue
            numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
            # dates from date dtypes only, as the estimator: a column of date strings is text to ContextTab
            dated = pd.api.types.is_datetime64_any_dtype(col)
            kind = "text" if name in declared else "date" if dated else "number" if numeric else "text"
            columns.append({"name": _json_value(name), "kind": kind})
        if not columns:
            raise TabTuneError(f"no usable feature columns: every column is constant or empty ({', '.join(dropped)})")
        if len(columns) >= MAX_COLUMNS:
            raise TabTuneError(f"ContextTab reads at most {MAX_COLUMNS - 1} feature columns; this table has "
                               f"{len(columns)} (drop some with dataset.drop_columns)")
        target = getattr(y, "name", None)
        self.state = {"columns": columns, "dropped": dropped, "input_columns": [str(c) for c in frame.columns],
                      "target": str(target) if target is not None else "target", "vocabulary": []}
        self._index, self.frozen = {}, False
        return self

    def freeze(self) -> None:
        """The vocabulary is final (the context is built): later strings are transient, never saved."""
        self.frozen = True

    @property
    def feature_names(self) -> list[str]:
        """One name per column the model reads (what ``feature_limit`` counts)."""
        return [str(c["name"]) for c in self.state["columns"]]

    @property
    def column_names(self) -> list[str]:
        """The feature columns' names, then the target's: what the model reads as each column's header."""
        return [str(c["name"]) for c in self.state["columns"]] + [self.state["target"]]

    @property
    def widths(self) -> list[int]:
        return [4 if c["kind"] == "date" else 1 for c in self.state["columns"]]

    def transform(self, frame) -> np.ndarray:
        """The float32 matrix described in the class docstring; new strings join the vocabulary."""
        from ..data.preprocess import _to_datetime

        missing = [str(c["name"]) for c in self.state["columns"] if c["name"] not in frame.columns]
        if missing:
            raise TabTuneError(f"column {missing[0]!r} is missing from the table (the model was fitted with it)")
        self.transient, self._transient_index = [], {}  # transient ids hold for this call's matrix only
        blocks = []
        for spec in self.state["columns"]:
            col = frame[spec["name"]]
            if spec["kind"] == "number":
                values = pd.to_numeric(col, errors="coerce").astype("float64").to_numpy()
                blocks.append(np.where(np.isfinite(values), values, np.nan)[:, None])
            elif spec["kind"] == "date":
                dt = _to_datetime(col)
                parts = np.stack([dt.dt.year.clip(2000, 2050) - 2000 + 1, dt.dt.month, dt.dt.day,
                                  dt.dt.weekday + 1], axis=1).astype("float64")
                blocks.append(np.nan_to_num(parts, nan=0.0))
            else:
                texts = [MISSING_TEXT if pd.isna(v) else str(v) for v in col]
                blocks.append(np.array([self._id(t) for t in texts], dtype="float64")[:, None])
        return np.hstack(blocks).astype(np.float32)

    def _id(self, text: str) -> int:
        if text in self._index:
            return self._index[text]
        if not self.frozen:
            self._index[text] = len(self.state["vocabulary"])
            self.state["vocabulary"].append(text)
            return self._index[text]
        if text not in self._transient_index:
            self._transient_index[text] = len(self.state["vocabulary"]) + len(self.transient)
            self.transient.append(text)
        return self._transient_index[text]

    def fit_transform(self, frame, y=None) -> np.ndarray:
        return self.fit(frame, y).transform(frame)

    def to_json(self) -> dict:
        return self.state

    @classmethod
    def from_json(cls, state: dict) -> "ContextTabTable":
        return cls(state)


# -- the adapter --------------------------------------------------------------------------------------
QUERY_CHUNK = 500        # query rows per forward at prediction (the reference: 1,000; the same answers)
MAX_TOKENS = 4096        # bounds the rows x columns one attention call holds at prediction
REFERENCE_SEED = 42      # the reference estimator's fixed seed: its context sample and its class order


def reference_class_order(y_context: np.ndarray) -> np.ndarray:
    """The task classes in the order of the reference's class ids: class ``order[j]`` is read as id ``j``.

    The reference's tokenizer ranks the context's classes by count (``value_counts``; a tie goes to the class
    seen first in the context, which pandas 3's stable sort keeps; the reference's pandas 2 sorts ties
    unstably), keeps the first 62 and shuffles them with ``np.random.seed(42); np.random.permutation``, the
    same draw as ``RandomState(42).permutation``. The class ids mean something to the weights: given sorted
    ids instead, random weights answered up to 0.5 apart."""
    classes, first, counts = np.unique(np.asarray(y_context), return_index=True, return_counts=True)
    ranked = classes[np.lexsort((first, -counts))][:MAX_CLASSES]
    return ranked[np.random.RandomState(REFERENCE_SEED).permutation(len(ranked))]


def episode_class_ids(y_context: np.ndarray, n_classes: int) -> np.ndarray:
    """``ids[c]``: the id task class ``c`` has in a training episode whose context labels are ``y_context``.

    The context's classes take the ids prediction gives them (:func:`reference_class_order`); classes the
    context lacks take the remaining ids in their own order."""
    order = reference_class_order(y_context)
    order = np.concatenate([order, np.setdiff1d(np.arange(n_classes), order)])
    ids = np.empty(n_classes, dtype=np.int64)
    ids[order] = np.arange(n_classes)
    return ids


def _numbers(values: Tensor, n_context: int) -> Tensor:
    """Each column standardised by its context rows, as the reference does for the official (l2) models.

    Missing values take the context mean, values are clipped to the context's 0.5 and 99.5 percentiles,
    then centred and scaled by the clipped context's mean and (population) standard deviation."""
    context = values[:n_context]
    mean = torch.nan_to_num(context.nanmean(0), nan=0.0)
    values = torch.where(torch.isnan(values), mean, values)
    low, high = torch.quantile(values[:n_context], torch.tensor([0.005, 0.995], dtype=values.dtype), dim=0)
    values = torch.maximum(torch.minimum(values, high), low)
    context = values[:n_context]
    std = context.std(0, unbiased=False)
    return (values - context.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))


def _scaled_target(y_context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The regression target clipped to its 0.5/99.5 percentiles and standardised, with its mean and std."""
    low, high = torch.quantile(y_context, torch.tensor([0.005, 0.995], dtype=y_context.dtype))
    clipped = y_context.clamp(low, high)
    std = clipped.std(unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (clipped - clipped.mean()) / std, clipped.mean(), std


class ContextTabAdapter(ContextTabSpec, ModelAdapter):
    def __init__(self):
        self.table = None  # the fitted ContextTabTable of this pipeline (None: every column a number)
        self.encoder_config = ContextTabConfig()
        self._text = None  # (vocabulary size, (V, 384) embeddings) of the table's strings

    # -- tables ----------------------------------------------------------------------------------
    def preprocessor(self, config: ModelConfig, text_columns: list | None = None, text_features: int = 8):
        """This model's own preprocessor: every string column is text (``text_features`` is for the others)."""
        self.table, self.encoder_config = ContextTabTable(text_columns=text_columns), config
        return self.table

    def preprocessor_from_json(self, state: dict, config: ModelConfig) -> ContextTabTable:
        self.table, self.encoder_config = ContextTabTable.from_json(state), config
        return self.table

    def _encoder(self) -> TextEncoder:
        config = self.encoder_config
        return shared_encoder(getattr(config, "text_encoder", None), bool(config.allow_download))

    def _layout(self, n_matrix_columns: int) -> tuple[list[str], list[str], list[str]]:
        """(kinds, column names incl. the target's, kind of every matrix column)."""
        if self.table is None:  # a bare matrix (tests, tools): numbers under generic names
            kinds = ["number"] * n_matrix_columns
            return kinds, [f"x{i}" for i in range(n_matrix_columns)] + ["target"], kinds
        kinds = [c["kind"] for c in self.table.state["columns"]]
        per_column = [k for k, w in zip(kinds, self.table.widths) for _ in range(w)]
        if len(per_column) != n_matrix_columns:
            raise TabTuneError(f"ContextTab: the table has {len(per_column)} matrix columns, got {n_matrix_columns}")
        return kinds, self.table.column_names, per_column

    def _text_embeddings(self, device) -> Tensor:
        """(V, 384) embeddings of the vocabulary, then of the latest transform's transient strings."""
        vocabulary, transient = self.table.state["vocabulary"], self.table.transient
        if self._text is None or self._text[0] != len(vocabulary):
            self._text = (len(vocabulary), torch.as_tensor(self._encoder().encode(vocabulary)))
        embeddings = self._text[1]
        if transient:
            embeddings = torch.cat([embeddings, torch.as_tensor(self._encoder().encode(transient))])
        return embeddings.to(device)

    def _inputs(self, X: Tensor, n_context: int) -> dict:
        """The keyword tensors of :meth:`ConTextTab.forward` for one table ``X`` (rows, matrix columns)."""
        kinds, names, per_column = self._layout(X.shape[1])
        device, n_rows, n_features = X.device, X.shape[0], len(kinds)
        kind_of = np.array(per_column)
        first = np.cumsum([0] + [4 if k == "date" else 1 for k in kinds])[:-1]
        columns = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in ("number", "date", "text")}
        numbers = X.new_zeros(n_rows, n_features)
        if columns["number"]:
            numbers[:, columns["number"]] = _numbers(X[:, first[columns["number"]]].float(), n_context)
        has_number = torch.zeros(n_features, dtype=torch.bool, device=device)
        has_number[columns["number"]] = True
        dates = torch.zeros(n_rows, n_features, 4, dtype=torch.long, device=device)
        for i in columns["date"]:
            dates[:, i] = X[:, first[i]:first[i] + 4].long().clamp(0)
        text = torch.zeros(n_rows, n_features, TEXT_DIM, dtype=torch.float16, device=device)
        if columns["text"]:
            ids = X[:, np.flatnonzero(kind_of == "text")].long()
            text[:, columns["text"]] = self._text_embeddings(device)[ids]
        column_names = torch.as_tensor(self._encoder().encode(names), device=device)
        return {"column_names": column_names, "text": text, "numbers": numbers,
                "has_number": has_number.expand(n_rows, -1), "dates": dates}

    # -- building ------------------------------------------------------------------------------
    def build(self, config: ModelConfig, task: Task):
        self.encoder_config = config
        if not config.pretrained:
            architecture = {**self.random_size(config), "task": task.kind}
            return self.from_architecture(architecture), architecture
        path = self.checkpoint_file(config, task)
        state, n_in_file = load_contexttab_state(path)
        # the release names the file write_checkpoint writes back
        architecture = {**file_architecture(state, path), "task": task.kind,
                        "release": getattr(config, "release", "contexttab")}
        if n_in_file == 1:
            state = share_single_layer(state, architecture["n_layers"])
        module = self.from_architecture(architecture)
        load_weights(module, state, path)
        return module, architecture

    def from_architecture(self, architecture: dict) -> nn.Module:
        architecture = dict(architecture)
        task = architecture.pop("task", "classification")
        architecture.pop("release", None)  # the same module for every release
        module = ConTextTab(**architecture)
        module.tabtune_task = task  # which head runs: LoRA reaches only that one
        return module

    def write_checkpoint(self, module: nn.Module, architecture: dict, task: Task, path: Path) -> Path:
        """The official format: ``torch.save`` of the whole state dict, every encoder layer included,
        under the file name of the architecture's release (``base.pt`` unless built from sap-rpt-1-oss).

        tabtune's loader (``model.checkpoint=``) reads it back as it is. The reference's
        ``load_weights`` loads it too, but by default copies the last layer over the others, so it
        reads layers that differ (after base-ft, or LoRA merged into the encoder) only with
        ``is_copy_last_layer=False``. The format has no head count: a module whose heads are not 64
        wide (the random ``tiny`` size) has no official checkpoint."""
        if not isinstance(module, ConTextTab):
            raise TabTuneError(f"ContextTab: write_checkpoint takes the plain ConTextTab module, "
                               f"not {type(module).__name__} (merge LoRA adapters first)")
        if module.n_heads * HEAD_DIM != module.hidden_size:
            raise TabTuneError(f"ContextTab: the official format implies {HEAD_DIM}-wide heads; this module has "
                               f"{module.n_heads} for hidden size {module.hidden_size}, so no official file can "
                               f"hold it")
        filename = Path(RELEASES[architecture.get("release", "contexttab")][1]).name
        state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
        return rundir.write_file(Path(path) / filename, lambda tmp: torch.save(state, tmp))

    # -- forward -------------------------------------------------------------------------------
    def episode_logits(self, module, X_context: Tensor, y_context: Tensor, X_query: Tensor, task: Task,
                       config=None) -> Tensor:
        n_context, outputs, scales = X_context.shape[1], [], []
        for Xc, yc, Xq in zip(X_context, y_context, X_query):
            inputs = self._inputs(torch.cat([Xc, Xq]), n_context)
            if task.is_classification:
                # the class ids prediction gives this context (reference_class_order); a class the episode's
                # context lacks takes one of the ids left over, so every task class keeps a logit
                ids = episode_class_ids(yc.cpu().numpy(), task.n_classes)
                id_of = torch.as_tensor(ids, device=yc.device)
                logits = module(**inputs, y_context=id_of[yc.long()], n_classes=task.n_classes)
                outputs.append(logits[:, id_of])  # back to the task's class order
            else:
                scaled, mean, std = _scaled_target(yc.float())
                scales.append(torch.stack([mean, std]))
                outputs.append(module(**inputs, y_context=scaled, regression=True))
        self._episode_scale = torch.stack(scales) if scales else None
        return torch.stack(outputs)

    def episode_loss(self, outputs: Tensor, y_query: Tensor, task: Task) -> Tensor:
        if task.is_classification:
            return super().episode_loss(outputs, y_query, task)
        mean, std = self._episode_scale[:, :1], self._episode_scale[:, 1:]
        return F.mse_loss(outputs, (y_query.float() - mean) / std)  # the official models' l2 objective

    def plan_episodes(self, episodes: list, X: np.ndarray, config: ModelConfig, rng: np.random.Generator) -> list:
        """The sampler's episodes with the matrix columns in place: they follow the table's layout (a
        column's order means nothing to the model, which reads its name)."""
        return [dataclasses.replace(e, feature_order=None) for e in episodes]

    def prediction_context(self, labels, n_rows: int, config: ModelConfig, seed: int) -> np.ndarray:
        """Every training row up to ``max_context_rows``; past it the reference's draw, whatever the run's seed:
        ``DataFrame.sample(max_context_rows, random_state=42)``, i.e. the first rows of
        ``RandomState(42).permutation(n_rows)``, in that order (not stratified: a rare class may miss it)."""
        cap = config.max_context_rows
        if cap is None or n_rows <= cap:
            return np.arange(n_rows)
        return np.random.RandomState(REFERENCE_SEED).permutation(n_rows)[:cap]

    @torch.no_grad()
    def predict(self, module, X_context, y_context, X_query, task: Task, config: ModelConfig, device) -> np.ndarray:
        module.eval()
        for sub in module.modules():
            if isinstance(sub, ConTextTab):
                sub.max_tokens_per_chunk = MAX_TOKENS
        Xc = torch.as_tensor(X_context, dtype=torch.float32, device=device)
        Xq_all = torch.as_tensor(X_query, dtype=torch.float32, device=device)
        y = torch.as_tensor(y_context, device=device)
        if task.is_classification:
            # the model reads the reference's class ids: id j is task class order[j]
            order = reference_class_order(np.asarray(y_context))
            n_ids = len(order)
            id_of = np.zeros(task.n_classes, dtype=np.int64)
            id_of[order] = np.arange(n_ids)
            y = torch.as_tensor(id_of[np.asarray(y_context, dtype=np.int64)], device=device)
        else:
            y, mean, std = _scaled_target(y.float())
        total = 0.0
        for member in range(config.n_estimators):
            shift = member % n_ids if task.is_classification else 0
            parts = []
            for start in range(0, len(Xq_all), QUERY_CHUNK):
                inputs = self._inputs(torch.cat([Xc, Xq_all[start:start + QUERY_CHUNK]]), len(Xc))
                if task.is_classification:
                    logits = module(**inputs, y_context=(y + shift) % n_ids, n_classes=n_ids)
                    parts.append(torch.softmax(logits.float() / config.softmax_temperature, dim=-1))
                else:
                    parts.append(module(**inputs, y_context=y, regression=True).float() * std + mean)
            pred = torch.cat(parts).cpu().numpy()
            total = total + (class_shift_probs(pred, shift) if task.is_classification else pred)
        pred = total / config.n_estimators
        if not task.is_classification:
            return pred
        # to the task's classes; one the context lacks has no id and no probability, as in the reference
        probs = np.zeros((len(pred), task.n_classes), dtype=pred.dtype)
        probs[:, order] = pred
        return probs / probs.sum(axis=1, keepdims=True)

    # -- LoRA ------------------------------------------------------------------------------------
    def lora_targets(self, module: nn.Module, prefixes):
        model = next(m for m in module.modules() if isinstance(m, ConTextTab))
        head = "reg" if getattr(model, "tabtune_task", "classification") == "regression" else "classif"
        prefix = next(n for n, m in module.named_modules() if m is model)
        prefixes = [f"{p}_{head}" if p in ("dense", "output_head") else p for p in (prefixes or self.default_lora_prefixes)]
        targets = self.modules_under(module, [f"{prefix}.{p}" if prefix else p for p in prefixes])
        kinds = {c["kind"] for c in self.table.state["columns"]} if self.table is not None else {"number"}
        # an adapter on a layer this task and table never feed would be dead: the other task's label
        # layer, and the text / number / date embeddings of a table without such columns
        idle = {"target_embedding_layer_reg" if head == "classif" else "target_embedding_layer_classif"}
        idle |= {name for kind, name in (("text", "content_remapping"), ("number", "number_embeddings"),
                                          ("date", "date_embeddings")) if kind not in kinds}
        return [n for n, m in targets.items() if type(m) in (nn.Linear, nn.Embedding)
                and not any(part in idle for part in n.split("."))], []
