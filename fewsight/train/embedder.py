"""Metric-learning training of a :class:`~fewsight.fewshot.CropEmbedder` on the shared Lightning loop.

* :class:`EmbeddingObjective` / :func:`build_objective` — the loss of ``loss.name`` built from
  :mod:`fewsight.losses` (and the parameters it learns: class weights, centres, a classifier).
* :class:`EmbedderModule` — the LightningModule: trains ``head_embeddings`` of class-balanced batches;
  validates every epoch with Recall@k / MAP@R of held-out classes (unit embeddings of one scale, no
  whitening; across domains — queries of domain 0 against the gallery of domain 1 — when the data has
  them, else leave-one-out); AdamW / SGD with the loss parameters at ``lr × param_lr_mult`` and no
  weight decay; warmup + cosine per step.
* :func:`train_embedder` — :func:`~fewsight.train.loop.prepare_run`, the data module,
  :func:`~fewsight.train.loop.build_trainer` (checkpoints each epoch + best + last, exact resume, AMP,
  clipping, progress bar, logs, seeds, DDP) and :func:`~fewsight.train.loop.fit`; then, on global rank
  0, the learned whitening (:func:`fewsight.retrieval.learn_whitening`) fitted on augmented epochs of
  the training classes in every domain (embedded as every reader will: with the model's test-time
  augmentation), the file ``OUT/embedder.pt`` (:func:`fewsight.hub.save_model`) and ``OUT/metrics.json``
  (test retrieval before / after whitening, and with CSLS against the whitened training views of the
  query domain).

Outputs under ``out_dir``: ``config.yaml``, ``checkpoints/`` (as detectors), ``logs/``, ``embedder.pt``,
``metrics.json``.

Example:
    >>> import torch
    >>> from fewsight.train.embedder_config import EmbedderLossConfig
    >>> objective = build_objective(EmbedderLossConfig(name="circle_arcface"), num_classes=3, dim=8)
    >>> sorted(objective(torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 2])))
    ['arcface', 'circle']
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from fewsight.eval.embedding import embed_dataset, retrieval_metrics
from fewsight.eval.io import write_json
from fewsight.fewshot import CropEmbedder
from fewsight.hub import save_model
from fewsight.losses import ArcFaceLoss, CCSLoss, CenterLoss, CircleLoss, CosFaceLoss, TripletLoss
from fewsight.retrieval import Whitening, learn_whitening
from fewsight.train.config import OptimizerConfig, ScheduleConfig
from fewsight.train.embedder_config import EmbedderLossConfig, EmbedderTrainConfig, save_embedder_config
from fewsight.train.embedder_data import EmbedderDataModule, build_embedder_data
from fewsight.train.loop import TrainResult, build_trainer, check_resume, checkpoint_paths, fit, prepare_run
from fewsight.train.module import lr_factor, parameter_groups

__all__ = ["EmbedderModule", "EmbeddingObjective", "build_objective", "train_embedder"]


class EmbeddingObjective(nn.Module):
    """Named loss terms of ``(embeddings: Tensor[N, D], labels: Long[N])``, each already weighted.

    Any of: ``pair`` (circle / triplet on the batch's pairs), ``proxy`` (ArcFace / CosFace class
    weights), ``classifier`` (softmax cross-entropy) with ``center`` or ``ccs`` on top. The modules
    that own parameters are sub-modules, so the optimiser and checkpoints see them.
    """

    def __init__(
        self,
        *,
        pair: nn.Module | None = None,
        proxy: nn.Module | None = None,
        proxy_weight: float = 1.0,
        classifier: nn.Linear | None = None,
        center: CenterLoss | None = None,
        center_weight: float = 0.0,
        ccs: CCSLoss | None = None,
        ccs_weight: float = 0.0,
        pair_name: str = "pair",
        proxy_name: str = "proxy",
    ) -> None:
        super().__init__()
        self.pair, self.proxy, self.classifier, self.center, self.ccs = pair, proxy, classifier, center, ccs
        self.proxy_weight, self.center_weight, self.ccs_weight = float(proxy_weight), float(center_weight), float(ccs_weight)
        self.pair_name, self.proxy_name = pair_name, proxy_name

    def forward(self, embeddings: Tensor, labels: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.pair is not None:
            out[self.pair_name] = self.pair(embeddings, labels)
        if self.proxy is not None:
            out[self.proxy_name] = self.proxy_weight * self.proxy(embeddings, labels)
        if self.classifier is not None:
            out["ce"] = F.cross_entropy(self.classifier(embeddings.float()), labels, ignore_index=-1)
        if self.center is not None:
            out["center"] = self.center_weight * self.center(embeddings, labels)
        if self.ccs is not None and self.classifier is not None:
            out["ccs"] = self.ccs_weight * self.ccs(embeddings, self.classifier.weight, labels)
        return out


def build_objective(cfg: EmbedderLossConfig, num_classes: int, dim: int) -> EmbeddingObjective:
    """The :class:`EmbeddingObjective` of ``cfg.name`` for ``num_classes`` training classes and ``dim``-D
    embeddings (see :mod:`fewsight.train.embedder_config` for the names)."""
    name = cfg.name

    def circle() -> CircleLoss:
        return CircleLoss(m=cfg.circle_m, gamma=cfg.circle_gamma)

    def arcface() -> ArcFaceLoss:
        return ArcFaceLoss(num_classes, dim, scale=cfg.margin_scale, margin=cfg.arcface_margin)

    if name == "circle":
        return EmbeddingObjective(pair=circle(), pair_name="circle")
    if name == "triplet":
        triplet = TripletLoss(margin=cfg.triplet_margin, mining=cfg.triplet_mining, normalize=True)
        return EmbeddingObjective(pair=triplet, pair_name="triplet")
    if name == "arcface":
        return EmbeddingObjective(proxy=arcface(), proxy_name="arcface")
    if name == "cosface":
        cosface = CosFaceLoss(num_classes, dim, scale=cfg.margin_scale, margin=cfg.cosface_margin)
        return EmbeddingObjective(proxy=cosface, proxy_name="cosface")
    if name == "circle_arcface":
        # Pairs of the batch (the cross-domain positives retrieval is measured on) plus class proxies,
        # which bring every training class in as a negative at every step.
        return EmbeddingObjective(
            pair=circle(), pair_name="circle", proxy=arcface(), proxy_name="arcface", proxy_weight=cfg.aux_weight
        )
    if name == "center_ce":
        return EmbeddingObjective(
            classifier=nn.Linear(dim, num_classes), center=CenterLoss(num_classes, dim), center_weight=cfg.center_weight
        )
    if name == "ccs_ce":
        # Softmax CE on a bias-free classifier plus CCS pulling each embedding towards its class's
        # (detached) classifier vector.
        classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(classifier.weight, std=dim**-0.5)
        return EmbeddingObjective(classifier=classifier, ccs=CCSLoss(), ccs_weight=cfg.ccs_weight)
    from fewsight.errors import ConfigError

    raise ConfigError(f"loss.name: expected one of the embedder losses, got {name!r}")


class EmbedderModule(L.LightningModule):
    """Train / validate a :class:`CropEmbedder` (see the module docstring).

    Args:
        embedder: the network (its whitening stays the identity during training).
        objective: the loss (:func:`build_objective`).
        optimizer, schedule: the shared optimiser / learning-rate sections.
        param_lr_mult: learning-rate factor of ``objective``'s parameters.
        ks: Recall@k reported at validation.
    """

    def __init__(
        self,
        embedder: CropEmbedder,
        objective: EmbeddingObjective,
        *,
        optimizer: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        param_lr_mult: float = 10.0,
        ks: Sequence[int] = (1, 5, 10),
    ) -> None:
        super().__init__()
        self.model, self.objective = embedder, objective
        self.optimizer_config = optimizer or OptimizerConfig(name="adamw", lr=2e-3, weight_decay=5e-4)
        self.schedule_config = schedule or ScheduleConfig()
        self.param_lr_mult, self.ks = float(param_lr_mult), [int(k) for k in ks]
        self.last_val_metrics: dict[str, Any] | None = None
        self._val: list[tuple[Tensor, Tensor, Tensor]] = []
        # Plain containers only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({
            "model_spec": embedder.to_spec(),
            "optimizer": _plain(dataclasses.asdict(self.optimizer_config)),
            "schedule": _plain(dataclasses.asdict(self.schedule_config)),
            "param_lr_mult": self.param_lr_mult,
        })  # fmt: skip

    def on_fit_start(self) -> None:
        # Faster convolutions on CPU and GPU alike; values are unchanged.
        self.model.to(memory_format=torch.channels_last)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels, _ = batch
        e = self.model.head_embeddings(images.contiguous(memory_format=torch.channels_last))
        losses = self.objective(e, labels)
        total = torch.stack([v.float() for v in losses.values()]).sum()
        n = len(labels)
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach().float(), batch_size=n, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/loss", total.detach(), batch_size=n, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        return total

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels, domains = batch
        e = F.normalize(self.model.head_embeddings(images.contiguous(memory_format=torch.channels_last)).float(), dim=1)
        self._val.append((e.cpu(), labels.cpu(), domains.cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        e, y, d = (torch.cat(parts) for parts in zip(*self._val))
        self._val = []
        metrics = domain_retrieval(e, y, d, self.ks)
        # Every rank validates the whole set: the values agree, and the DDP mean is a no-op.
        for k, v in metrics.items():
            if k.startswith(("recall@", "map@r")):
                self.log(f"val/{k}", torch.tensor(float(v), dtype=torch.float32), prog_bar=k == "recall@1", sync_dist=True)
        if not self.trainer.sanity_checking:
            self.last_val_metrics = metrics

    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_config
        groups = parameter_groups(self.model, cfg.weight_decay, cfg.norm_weight_decay)
        extra = [p for p in self.objective.parameters() if p.requires_grad]
        if extra:
            groups.append({"params": extra, "weight_decay": 0.0, "lr": cfg.lr * self.param_lr_mult})
        if cfg.name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        elif cfg.name == "adam":
            opt = torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        epochs = max(1, int(self.trainer.max_epochs or 1)) if self._trainer is not None else 1
        schedule, per_epoch = self.schedule_config, max(1, total // epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, schedule, total, per_epoch))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def domain_retrieval(
    embeddings: Tensor, labels: Tensor, domains: Tensor, ks: Sequence[int], *, csls_reference: Tensor | None = None,
    csls_k: int = 10,
) -> dict[str, Any]:
    """Retrieval figures of labelled embeddings: queries of domain 0 against the gallery of domain 1
    when both exist, else leave-one-out over all (``domains`` ``-1``: none)."""
    if bool((domains == 0).any()) and bool((domains == 1).any()):
        q, g = domains == 0, domains == 1
        out = retrieval_metrics(embeddings[q], labels[q], embeddings[g], labels[g], ks=ks,
                                csls_reference=csls_reference, csls_k=csls_k)
        return {**out, "protocol": "domain 0 queries, domain 1 gallery"}
    return {**retrieval_metrics(embeddings, labels, ks=ks), "protocol": "leave-one-out"}


def fit_whitening(embedder: CropEmbedder, dataset: Any, *, epochs: int = 2, shrink: float = 0.0,
                  batch_size: int = 128) -> tuple[Whitening, Tensor, Tensor, Tensor]:
    """Fit :func:`learn_whitening` on ``epochs`` augmented epochs of ``dataset`` (epochs 1000, 1001, ...:
    augmentations training never used), embedded with ``embedder``'s test-time augmentation and its
    current (identity) whitening. Returns ``(whitening, unit views Tensor[V, D], labels, domains)``."""
    from fewsight.data.crops import item_domains

    views, labels = zip(*(embed_dataset(embedder, dataset, batch_size=batch_size, epoch=1000 + e) for e in range(epochs)))
    dom = item_domains(dataset)
    domains = torch.full((len(dataset),), -1, dtype=torch.long) if dom is None else torch.as_tensor(dom)
    x, y = torch.cat(views), torch.cat(labels)
    return learn_whitening(x, y, shrink=shrink), x, y, domains.repeat(epochs)


def train_embedder(
    cfg: EmbedderTrainConfig, *, callbacks: Sequence[Callback] = (), evaluate: bool = True
) -> TrainResult:
    """Train the embedder ``cfg`` describes (see the module docstring for the steps and outputs)."""
    start = time.perf_counter()
    out_dir, ckpt_path = prepare_run(cfg)
    data = build_embedder_data(cfg.data, seed=cfg.seed)
    m = cfg.model
    embedder = CropEmbedder(dim=m.dim, grid=m.grid, blocks=m.blocks, crop_size=cfg.data.size, pretrained=m.pretrained,
                            tta_scales=m.tta_scales, tta_fill=m.tta_fill)
    objective = build_objective(cfg.loss, data.train.num_classes, m.dim)
    module = EmbedderModule(embedder, objective, optimizer=cfg.optimizer, schedule=cfg.schedule,
                            param_lr_mult=cfg.loss.param_lr_mult, ks=cfg.eval.ks)
    d = cfg.data
    datamodule = EmbedderDataModule(data.train, data.val, classes_per_batch=d.classes_per_batch, items_per_class=d.items_per_class,
                                    passes=d.passes, val_batch_size=d.val_batch_size, num_workers=d.num_workers, seed=cfg.seed)
    ckpt_path = check_resume(ckpt_path, out_dir / "checkpoints", module.hparams.get("model_spec"))
    trainer = build_trainer(cfg, out_dir, has_val=data.val is not None, callbacks=callbacks)
    if trainer.is_global_zero:
        save_embedder_config(cfg, out_dir / "config.yaml")
    fit(trainer, module, datamodule, ckpt_path)

    embedder = module.model.to(memory_format=torch.contiguous_format).eval()
    result = TrainResult(model=embedder, out_dir=out_dir, val_metrics=module.last_val_metrics)
    result.last_checkpoint, result.best_checkpoint = checkpoint_paths(trainer, cfg.checkpoint.monitor)
    if not trainer.is_global_zero:
        return result
    train_seconds = time.perf_counter() - start
    bs = cfg.data.val_batch_size
    metrics: dict[str, Any] = {"epochs": trainer.current_epoch, "train_classes": data.train.num_classes}
    if data.test is not None and evaluate:
        test_e, test_y = embed_dataset(embedder, data.test, batch_size=bs)
        test_d = _domains(data.test)
    if cfg.whitening.enabled:
        w, views, _, view_domains = fit_whitening(embedder, data.train, epochs=cfg.whitening.epochs,
                                                  shrink=cfg.whitening.shrink, batch_size=bs)
        embedder.set_whitening(w.mean, w.projection)
        metrics["whitening"] = {"views": len(views), "epochs": cfg.whitening.epochs, "shrink": cfg.whitening.shrink}
    meta = {"task": "embedder", "loss": cfg.loss.name, "seed": cfg.seed, "epochs": trainer.current_epoch,
            "train_classes": list(map(str, data.train.classes)), "whitened": cfg.whitening.enabled}
    result.model_path = save_model(embedder, out_dir / "embedder.pt", metadata=meta)
    if data.test is not None and evaluate:
        ks = cfg.eval.ks
        metrics["test"] = {"cosine": domain_retrieval(test_e, test_y, test_d, ks)}
        if cfg.whitening.enabled:
            wq = w(test_e.double()).float()
            ref = w(views[view_domains == 0].double()).float() if bool((view_domains == 0).any()) else None
            metrics["test"]["whitened"] = domain_retrieval(wq, test_y, test_d, ks, csls_reference=ref, csls_k=cfg.eval.csls_k)
        metrics["test"]["num_classes"] = data.test.num_classes
        final = metrics["test"].get("whitened", metrics["test"]["cosine"])
        metrics["test_recall@1"] = final["recall@1"]
        if "csls" in final:
            metrics["test_recall@1_csls"] = final["csls"]["recall@1"]
    metrics["val_last"] = module.last_val_metrics
    metrics["train_seconds"] = train_seconds
    result.metrics = metrics
    write_json(metrics, out_dir / "metrics.json")
    result.seconds = time.perf_counter() - start
    return result


def _domains(dataset: Any) -> Tensor:
    from fewsight.data.crops import item_domains

    dom = item_domains(dataset)
    return torch.full((len(dataset),), -1, dtype=torch.long) if dom is None else torch.as_tensor(dom)


def _plain(obj: Any) -> Any:
    if isinstance(obj, (tuple, list)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
