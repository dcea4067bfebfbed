"""TabPFN through the tabpfn package: its architectures, its checkpoint format, LoRA on its real layers.

Versions. ``model.version`` picks the architecture the installed ``tabpfn``
package provides (``tabpfn.architectures.ARCHITECTURES``): v2, v2.5, v2.6, v3,
v3.5. The module is built with the package's own ``parse_config`` and
``get_architecture``; nothing here reimplements the transformer. v2 is the
default and its weights are open (``Prior-Labs/TabPFN-v2-clf`` /
``Prior-Labs/TabPFN-v2-reg``); later versions are gated on the Hub, so their
checkpoint is passed with ``model.checkpoint``. Random-weight named sizes
(``pretrained: false``) exist for v2.

Checkpoints are TabPFN's official format: a torch ``.ckpt`` holding a dict with
``state_dict``, ``config`` (the architecture config as a dict) and, from v2.5,
``architecture_name`` (v2 files have none), or a ``.safetensors`` file with the
same fields JSON-encoded in its header (v3.5). ``.ckpt`` files are read with
``torch.load(weights_only=True)``: no code from the file runs. Regression
checkpoints carry the bar distribution's bucket borders as ``criterion.borders``
(up to v2.6) or a ``regression_borders`` buffer (v3 on); we keep them as the
module's ``regression_borders`` buffer so they are saved and reloaded with the
weights.

Inputs. TabPFN's forward is sequence-first: ``x`` is (rows, batch, features),
``y`` (context rows, batch); it returns outputs for the rows after the context
only. In the column attention the query rows attend to the context rows alone
(multi-query, to the first key/value head), so a query never sees another
query's features or any label but the context's. One caveat belongs to the
package: in this uncached forward (the training episodes) its in-model
preprocessing decides whether a column is *constant* over all rows passed
(context and query); nothing else about the query rows reaches another row.
Prediction's cached forward fits that on the context alone.

Prediction is the package's own. ``predict`` hands our module (plain, fine-tuned, or with live LoRA
layers) to ``TabPFNClassifier`` / ``TabPFNRegressor`` through ``tabpfn.base.ModelSpecs`` and lets the
estimator do what it does for its own checkpoints: per-member preprocessing (quantile and power transforms,
SVD features, the fingerprint feature, outlier clipping, categorical encodings), feature and class shuffles,
target transforms, temperature and averaging, with the checkpoint's inference config (v2 / v2.5 files carry
none: the package's default for the version, as its loader guesses). With the same checkpoint file,
``n_estimators``, ``softmax_temperature`` and ``random_state=0`` it equals the estimator within float rounding
(about 1e-7; tests hold 1e-4). The boundary: the estimator is handed the user's numbers
(``raw_numbers``: float64, gaps as NaN), as a user would hand it the table; tabtune's shared preprocessor
encodes only categoricals (as codes), dates and text, and the package's modality detection runs on that
matrix as on any numeric array. With no setting the estimator runs at its own defaults (``"auto"`` members
and temperature from the inference config, ``random_state=0``, every training row as context), so the same
raw table gives ``TabPFNClassifier()``'s probabilities (``tests/test_package_defaults.py``).

Training sees what prediction sees. ``episode_logits`` fits the same estimator on each episode's context
(``fit_mode="fit_preprocessors"``, ``strategy.train_n_estimators`` members) and runs its own forward over the
query rows with torch's inference mode off: for classification the members' logits, averaged
(``member_logits``); for regression the members' probabilities carried onto the estimator's
standardised-target buckets and averaged, as ``predict`` does before its mean (``member_distribution``),
scored against the episode's targets in that estimator's units. In eval mode that is the prediction path
(``tests/test_adapters.py::test_the_training_forward_is_the_prediction_forward``,
``tests/test_tabpfn.py::test_the_regression_training_forward_is_the_estimators_distribution``).

The fitted estimator (members preprocessed) is kept in the adapter's ``ContextCache``, keyed by the
context, the module's weights (identity and in-place version of every parameter, LoRA included) and the
settings; any weight change, another context or other settings fit it again. It fits as the package does
by default (``fit_mode="fit_preprocessors"``: no key/value cache, so the memory is the package's).
``model.kv_cache=true`` fits with ``"fit_with_cache"`` instead: the context's keys/values are computed once
(about 256 bytes per context row, column and layer for each member) and repeated predicts run only the
query rows. One context is kept, so above 10 classes, where tabtune's class hierarchy predicts from several
contexts, each predict fits them again. The KV cache keeps the computed precision (the package quantises
v3 / v3.5 caches to int8 by default, which would move answers away from its uncached mode).

Regression. The model predicts a distribution over ``num_buckets`` bins
(``FullSupportBarDistribution``): training minimises its negative log density,
prediction is its mean (the estimator's, after its own target normalisation and transforms).
tabtune standardises the target, which is the space TabPFN's borders are meant for.

LoRA. In the v2 architecture of this package every projection is a separate
``nn.Linear`` whose forward runs (q/k/v/out projections, the block MLPs, the
embedders and the decoder), so plain peft LoRA reaches them, live. The seed
named the older multi-file architecture; the package now loads those
checkpoints by renaming keys (``_replace_keys_from_base_architecture``), and
the same map gives our default targets:

=========================================  ===========================================
seed's name (old ``base`` architecture)     module in ``tabpfn.architectures.tabpfn_v2``
=========================================  ===========================================
``encoder.5.layer``                          ``feature_group_embedder``
``y_encoder.2.layer``                        ``target_embedder``
``transformer_encoder.layers.{i}``           ``blocks.{i}``: ``per_sample_attention_between_features``
                                             and ``per_column_attention_between_cells``
                                             (``q_projection`` ``k_projection`` ``v_projection``
                                             ``out_projection``), ``mlp.0``, ``mlp.2``
                                             (old: packed ``_w_qkv`` / ``_w_out``,
                                             ``mlp.linear1`` / ``mlp.linear2``)
``decoder_dict.standard``                    ``output_projection`` (``.0``, ``.2``)
=========================================  ===========================================

v2.5 and v2.6 keep these names. v3 and v3.5 are different models (distribution
embedder, column aggregator, in-context blocks); their default target is
``icl_blocks``: ``icl_attention.{q,k,v,out}_projection`` and ``mlp.0`` / ``mlp.2``
of every in-context block (plus the attention's small softmax-scaling MLPs).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import rundir
from ..config import ModelConfig
from ..errors import TabTuneError
from .base import ContextCache, ModelAdapter, Task, known_class_loss, load_weights, to_task_classes
from .specs.tabpfn import ESTIMATOR, VERSIONS, TabPFNConfig, TabPFNSpec

# versions whose checkpoints keep the regression borders beside the model, as criterion.borders
CRITERION_BORDERS = ("tabpfn_v2", "tabpfn_v2_5", "tabpfn_v2_6")


def _architecture_module(architecture_name: str):
    from tabpfn.architectures import ARCHITECTURES

    if architecture_name not in ARCHITECTURES:
        raise TabTuneError(f"the installed tabpfn package has no architecture {architecture_name!r} "
                           f"(it has: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[architecture_name]


def _version_of(architecture_name: str) -> str:
    return next((v for v, a in VERSIONS.items() if a == architecture_name), architecture_name)


def _plain(value, path) -> dict:
    """``value`` as JSON data (a run saves its architecture as JSON), or a TabTuneError naming the file."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TabTuneError(f"{path}: its inference_config is not plain data ({exc})") from None


def _standard_normal_borders(num_buckets: int) -> Tensor:
    """Bucket borders at equal-probability quantiles of N(0, 1): the random-weight regressor's support."""
    levels = torch.linspace(0.0005, 0.9995, num_buckets + 1, dtype=torch.float64)
    return torch.distributions.Normal(0.0, 1.0).icdf(levels).float()


def read_checkpoint(path: Path) -> dict:
    """Return the checkpoint dict (``state_dict``, ``config``, ...) without running code from the file."""
    try:
        if path.suffix == ".safetensors":
            from tabpfn.checkpoint import Checkpoint  # header JSON + tensors: no pickle

            checkpoint = Checkpoint(path).load()
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TabTuneError(f"{path}: not a TabPFN checkpoint ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise TabTuneError(f"{path}: not a TabPFN checkpoint (expected a dict with 'config' and 'state_dict')")
    return checkpoint


class TabPFNAdapter(TabPFNSpec, ModelAdapter):
    # -- building ------------------------------------------------------------------------------
    def build(self, config: ModelConfig, task: Task):
        version = getattr(config, "version", "v2")
        if version not in VERSIONS:
            raise TabTuneError(f"model.version: unknown TabPFN version {version!r} (known: {', '.join(VERSIONS)})")
        estimator = ESTIMATOR[task.kind]
        if not config.pretrained:
            if version != "v2":
                raise TabTuneError(f"model.pretrained=false: random-weight sizes exist for TabPFN v2 only, "
                                   f"not {version}")
            size = self.random_size(config)
            num_buckets = size.pop("num_buckets")
            arch_config = {**size, "max_num_classes": self.max_classes if task.is_classification else 0,
                           "num_buckets": -1 if task.is_classification else num_buckets}
            architecture = {"architecture_name": "tabpfn_v2", "config": arch_config, "estimator": estimator}
            module = self.from_architecture(architecture)
            if not task.is_classification:
                module.regression_borders.copy_(_standard_normal_borders(num_buckets))
            return module, architecture

        path = self.checkpoint_file(config, task)
        checkpoint = read_checkpoint(path)
        # v2 files have no architecture name; v2.5 ones call it "base" (as the package's loader reads them)
        architecture_name = checkpoint.get("architecture_name", "tabpfn_v2")
        architecture_name = "tabpfn_v2_5" if architecture_name == "base" else architecture_name
        if architecture_name != VERSIONS[version]:
            raise TabTuneError(f"{path}: this is a TabPFN {_version_of(architecture_name)} checkpoint, "
                               f"but model.version={version}")
        try:
            parsed, _ = _architecture_module(architecture_name).parse_config(dict(checkpoint["config"]))
        except Exception as exc:
            raise TabTuneError(f"{path}: its config is not a TabPFN {version} config "
                               f"({str(exc).splitlines()[0][:160]})") from None
        if task.is_classification and parsed.max_num_classes <= 0:
            raise TabTuneError(f"{path}: this TabPFN checkpoint has no classification head, but the task is classification")
        if not task.is_classification and parsed.num_buckets <= 0:
            raise TabTuneError(f"{path}: this TabPFN checkpoint has no regression head, but the task is regression")
        architecture = {"architecture_name": architecture_name, "config": dataclasses.asdict(parsed),
                        "estimator": estimator}
        if checkpoint.get("inference_config"):  # v2.6 on: the preprocessing the model was released with
            architecture["inference_config"] = _plain(checkpoint["inference_config"], path)
        module = self.from_architecture(architecture)
        state = dict(checkpoint["state_dict"])
        criterion = {k.replace("criterion.", ""): state.pop(k) for k in [k for k in state if "criterion." in k]}
        if not task.is_classification and "borders" in criterion:
            state["regression_borders"] = criterion["borders"]
        load_weights(module, state, path)
        return module, architecture

    def from_architecture(self, architecture: dict) -> nn.Module:
        arch = _architecture_module(architecture["architecture_name"])
        parsed, _ = arch.parse_config(dict(architecture["config"]))
        module = arch.get_architecture(parsed)
        if architecture.get("estimator") == "regressor" and not hasattr(module, "regression_borders"):
            # v2-v2.6 kept the borders beside the model; we keep them in it so a saved run is whole
            module.register_buffer("regression_borders", torch.zeros(parsed.num_buckets + 1))
        # what predict hands the package's estimator with the module: a plain attribute, not a weight
        module.tabtune_architecture = architecture
        return module

    def write_checkpoint(self, module: nn.Module, architecture: dict, task: Task, path: Path) -> Path:
        """The checkpoint the package's ``load_model`` (``TabPFNClassifier(model_path=...)``) reads, under the
        version's official file name: ``state_dict``, the parsed ``config`` and ``architecture_name``; a torch
        ``.ckpt`` (plain data: ``weights_only=True`` loads it), or for v3.5 a ``.safetensors`` file with the
        fields JSON-encoded in its header. Regression borders go where the version keeps them. From v2.6 the
        file must carry the ``inference_config`` the model was released with (``architecture`` holds it),
        since the package would otherwise guess the v2.5 preprocessing."""
        from tabpfn.constants import ModelVersion
        from tabpfn.model_loading import ModelType, _get_model_source

        name = architecture["architecture_name"]
        arch = _architecture_module(name)
        parsed, _ = arch.parse_config(dict(architecture["config"]))
        config = json.loads(json.dumps(dataclasses.asdict(parsed)))
        state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
        if "regression_borders" in state and name in CRITERION_BORDERS:
            del state["regression_borders"]
            criterion = bar_distribution(module).state_dict()
            state.update({f"criterion.{k}": v.clone().contiguous() for k, v in criterion.items()})
        checkpoint = {"state_dict": state, "config": config, "architecture_name": name}
        if architecture.get("inference_config"):
            checkpoint["inference_config"] = json.loads(json.dumps(architecture["inference_config"]))
        elif name not in ("tabpfn_v2", "tabpfn_v2_5"):
            # the package guesses the v2 / v2.5 preprocessing for a file without one: wrong for later versions
            raise TabTuneError(f"TabPFN {_version_of(name)}: its checkpoints carry their inference config, and this "
                               f"model's architecture does not hold the one it was loaded with; no file written")
        filename = _get_model_source(ModelVersion(_version_of(name)), ModelType(ESTIMATOR[task.kind])).default_filename
        target = Path(path) / filename
        if target.suffix == ".safetensors":
            from safetensors.torch import save_file

            metadata = {k: json.dumps(v) for k, v in checkpoint.items() if k != "state_dict"}
            return rundir.write_file(target, lambda tmp: save_file(state, tmp, metadata=metadata))
        return rundir.write_file(target, lambda tmp: torch.save(checkpoint, tmp))

    # -- forward -------------------------------------------------------------------------------
    @staticmethod
    def _forward(module, X_context: Tensor, y_context: Tensor, X_query: Tensor) -> Tensor:
        """(B, n_query, n_out) raw outputs: TabPFN's own forward, sequence-first."""
        X = torch.cat([X_context, X_query], dim=1).float().transpose(0, 1)
        out = module(X, y_context.transpose(0, 1).float())
        return out.transpose(0, 1)

    def episode_logits(self, module, X_context: Tensor, y_context: Tensor, X_query: Tensor, task: Task,
                       config=None) -> Tensor:
        """Each episode as ``predict`` sees it, through the estimator's own members (``strategy.train_n_estimators``
        of them). Classification: the members' logits averaged (``member_logits``); a class the episode's
        context lacks gets -inf. Regression: the log of the members' probabilities averaged on the estimator's
        standardised-target buckets (``member_distribution``), prediction's own distribution."""
        config = config if config is not None else TabPFNConfig()
        outputs, self._episode_targets = [], []
        for Xc, yc, Xq in zip(X_context, y_context, X_query):
            if len(torch.unique(yc)) < 2:  # the estimator wants two classes (or target values): the raw forward
                out = self._forward(module, Xc[None], yc[None], Xq[None])
                outputs.append(context_classes_to_task(out, yc[None], task.n_classes)[0] if task.is_classification
                               else out[0])
                self._episode_targets.append((bar_distribution(module), 0.0, 1.0))
                continue
            if not task.is_classification:
                estimator, log_probs = self.member_distribution(module, Xc, yc, Xq, config)
                outputs.append(log_probs)
                self._episode_targets.append((estimator.znorm_space_bardist_, estimator.y_train_mean_,
                                              estimator.y_train_std_))
                continue
            estimator, members = self.member_logits(module, Xc, yc, Xq, task, config)
            outputs.append(to_task_classes(members.mean(0), estimator.classes_, task.n_classes))
        return torch.stack(outputs)

    def _fitted_with_gradients(self, module, X_context: Tensor, y_context: Tensor, task: Task, config: ModelConfig):
        """The package's estimator fitted on one episode's context (``fit_mode="fit_preprocessors"``: each member's
        quantile/power transforms, SVD and fingerprint features, outlier clipping, shuffles and target transforms
        fitted on the context, as ``predict`` fits them), its forward set to run with torch's inference mode
        off, the switch the package's fine-tuner turns the same way, so gradients reach the module."""
        training = module.training
        estimator = self.fitted_estimator(module, X_context.detach().cpu().numpy(), y_context.detach().cpu().numpy(),
                                          task, config, X_context.device, fit_mode="fit_preprocessors")
        module.train(training)  # the estimator puts the model it holds in eval mode
        executor = estimator.executor_
        executor.use_torch_inference_mode = lambda use_inference: setattr(executor, "inference_mode", False)
        return estimator

    def member_logits(self, module, X_context: Tensor, y_context: Tensor, X_query: Tensor, task: Task,
                      config: ModelConfig):
        """``(estimator, logits)``: the module's raw logits for the query rows from every member of the estimator
        fitted on the context, (E, n_query, classes present), class permutations undone, with gradients."""
        estimator = self._fitted_with_gradients(module, X_context, y_context, task, config)
        logits = estimator._raw_predict(X_query.detach().cpu().numpy(), return_logits=False, return_raw_logits=True)
        return estimator, logits.to(X_context.device)

    def member_distribution(self, module, X_context: Tensor, y_context: Tensor, X_query: Tensor,
                            config: ModelConfig):
        """``(estimator, log_probs)``: the regressor fitted on the context, and the log of its members'
        probabilities averaged on its standardised-target buckets for the query rows, (n_query, buckets), with
        gradients: each member's output is carried across from its own target transform's borders, as
        ``predict`` does before taking the mean (the estimator's ``znorm_space_bardist_``)."""
        from tabpfn.validation import ensure_compatible_predict_input_sklearn

        estimator = self._fitted_with_gradients(module, X_context, y_context, Task("regression"), config)
        X = X_query.detach().cpu().numpy()
        X = estimator.text_transformer_.transform(estimator.date_transformer_.transform(X))
        X = ensure_compatible_predict_input_sklearn(X, estimator)  # predict's own steps before its forward
        return estimator, estimator._compute_aggregated_logits(X).to(X_context.device)

    def episode_loss(self, outputs: Tensor, y_query: Tensor, task: Task) -> Tensor:
        if task.is_classification:
            return known_class_loss(outputs, y_query)
        # each episode's target in its estimator's standardised units, scored by that estimator's distribution
        losses = [criterion.to(out.device)(out[:, None], ((y - mean) / std)[:, None].to(out.dtype)).mean()
                  for out, y, (criterion, mean, std) in zip(outputs, y_query, self._episode_targets)]
        return torch.stack(losses).mean()

    def __init__(self):
        # the fitted estimator of the last context: its members' preprocessing (and, under model.kv_cache,
        # its KV cache: at the default size about 256 bytes per context row, column and layer for each member)
        self.context_cache = ContextCache(size=1)

    @torch.no_grad()
    def predict(self, module, X_context, y_context, X_query, task: Task, config: ModelConfig, device) -> np.ndarray:
        """The package's own prediction for ``module``: its estimator, fitted on the context once per weights.

        ``TabPFNClassifier`` / ``TabPFNRegressor`` get our module through ``ModelSpecs`` (by reference, so
        fine-tuned or LoRA weights are the ones used) and run their own recipe on tabtune's matrix: per-member
        preprocessing, feature shifts, class permutations, temperature, averaging, target transforms. The fitted
        estimator is kept in ``context_cache``, keyed by the context and the weights' versions (with its
        key/value cache under ``model.kv_cache=true``).
        """
        module.eval()
        classes = np.unique(y_context) if task.is_classification else None
        if classes is not None and len(classes) == 1:  # the estimator wants two classes; the answer is sure
            probs = np.zeros((len(X_query), task.n_classes))
            probs[:, int(classes[0])] = 1.0
            return probs
        # the package's default fit_mode keeps no key/value cache; model.kv_cache=true keeps one
        fit_mode = "fit_with_cache" if getattr(config, "kv_cache", False) else "fit_preprocessors"
        settings = (task, config.n_estimators, config.softmax_temperature, str(device), fit_mode)
        # the entry holds the module (through ModelSpecs), so ids in its key cannot be reused while it lives
        estimator = self.context_cache.get(
            module, (X_context, y_context),
            lambda: self.fitted_estimator(module, X_context, y_context, task, config, device, fit_mode),
            extra=settings)
        X_query = np.asarray(X_query)  # the user's numbers (float64), as the estimator would be handed them
        if not task.is_classification:
            return np.asarray(estimator.predict(X_query), dtype=np.float64)
        probs = np.zeros((len(X_query), task.n_classes))
        # classes the context lacks get no probability, as in the estimator
        probs[:, estimator.classes_.astype(int)] = estimator.predict_proba(X_query)
        return probs

    def fitted_estimator(self, module, X_context, y_context, task: Task, config: ModelConfig, device,
                         fit_mode: str = "fit_preprocessors"):
        """The package's estimator for ``module``, fitted on the context (its members preprocessed, cache built).

        Settings are the package's defaults except those tabtune's config names (``n_estimators``,
        ``softmax_temperature``; null: the package's ``"auto"``), ``random_state=0`` (the package's default),
        the KV cache kept at the computed precision (the package would quantise v3 / v3.5 caches to int8, and
        then differ from its uncached predictions) and ``ignore_pretraining_limits`` (the package refuses more
        than 1,000 rows on a CPU unless told; it computes the same either way)."""
        from tabpfn import TabPFNClassifier, TabPFNRegressor

        base = module.get_base_model() if hasattr(module, "get_base_model") else module  # LoRA layers live in it
        spec = model_specs(base, task)
        members = "auto" if config.n_estimators is None else int(config.n_estimators)
        temperature = "auto" if config.softmax_temperature is None else float(config.softmax_temperature)
        kwargs = dict(model_path=spec, n_estimators=members, random_state=0, device=device,
                      fit_mode=fit_mode, kv_cache_precision="auto", ignore_pretraining_limits=True)
        if task.is_classification:
            estimator = TabPFNClassifier(softmax_temperature=temperature, **kwargs)
        else:
            estimator = TabPFNRegressor(**kwargs)
        X_context = np.asarray(X_context)
        y_context = np.asarray(y_context, dtype=np.int64 if task.is_classification else np.float32)
        return estimator.fit(X_context, y_context)

    # -- LoRA ------------------------------------------------------------------------------------
    def lora_targets(self, module: nn.Module, prefixes):
        if not prefixes and "blocks" not in dict(module.named_modules()):
            prefixes = self.default_lora_prefixes_v3
        return [n for n, m in self.modules_under(module, prefixes).items() if type(m) is nn.Linear], []

    def set_gradient_checkpointing(self, module: nn.Module, enabled: bool = True) -> None:
        """Refused: TabPFN's blocks take their input in a list that they empty, so a block cannot be run
        again in backward from what its first run was given (the generic recomputation would fail)."""
        if enabled:
            raise TabTuneError("strategy.gradient_checkpointing: not available for TabPFN (its blocks consume "
                               "their input, so they cannot be recomputed in backward); set it to false")


def context_classes_to_task(out: Tensor, y_context: Tensor, n_classes: int) -> Tensor:
    """(B, n_query, n_classes) logits from TabPFN's classification outputs, whose columns follow the classes the
    context holds in ascending order (its forward densifies the labels: the j-th column is the context's j-th
    smallest class), not the task's numbering; a class the context lacks gets -inf."""
    present = nn.functional.one_hot(y_context.long(), n_classes).amax(1).bool()  # (B, n_classes)
    column = (present.long().cumsum(-1) - 1).clamp(min=0)
    logits = out.gather(-1, column[:, None, :].expand(-1, out.shape[1], -1))
    return logits.masked_fill(~present[:, None, :], float("-inf"))


def bar_distribution(module: nn.Module):
    """The regression output distribution over the module's bucket borders (peft-wrapped or not)."""
    from tabpfn.architectures.shared.bar_distribution import FullSupportBarDistribution

    borders = next((b for n, b in module.named_buffers() if n.endswith("regression_borders")), None)
    if borders is None:
        raise TabTuneError("this TabPFN module has no regression borders: it was built for classification")
    return FullSupportBarDistribution(borders.detach().float().cpu(), ignore_nan_targets=True)


def model_specs(module: nn.Module, task: Task):
    """``tabpfn.base.ModelSpecs`` for ``module``: its architecture config, its inference config (the one its
    checkpoint carried, else the package's default for v2 / v2.5, as the package's loader guesses it) and,
    for regression, its bar distribution."""
    from tabpfn.base import ModelSpecs
    from tabpfn.constants import ModelVersion
    from tabpfn.inference_config import InferenceConfig

    architecture = getattr(module, "tabtune_architecture", None)
    if architecture is None:
        raise TabTuneError("this TabPFN module was not built by tabtune's adapter (build / from_architecture), "
                           "so its inference config is unknown")
    name = architecture["architecture_name"]
    parsed, _ = _architecture_module(name).parse_config(dict(architecture["config"]))
    saved = architecture.get("inference_config")
    if saved:
        saved = dict(saved)
        if "CONSTANT_FEATURE_COUNT" in saved:  # the key's older name, as the package's loader renames it
            saved["FEATURE_SUBSAMPLING_CONSTANT_FEATURE_COUNT"] = saved.pop("CONSTANT_FEATURE_COUNT")
        inference_config = InferenceConfig(**saved)
    elif name in ("tabpfn_v2", "tabpfn_v2_5"):
        version = ModelVersion.V2 if name == "tabpfn_v2" else ModelVersion.V2_5
        inference_config = InferenceConfig.get_default("multiclass" if task.is_classification else "regression",
                                                       version)
    else:
        raise TabTuneError(f"TabPFN {_version_of(name)}: this model's architecture does not hold the inference "
                           f"config its checkpoint carries; rebuild it from the checkpoint (model.checkpoint=...)")
    criterion = None if task.is_classification else bar_distribution(module)
    return ModelSpecs(model=module, architecture_config=parsed, inference_config=inference_config,
                      norm_criterion=criterion)
