"""TrackNet heat-map ball tracker: a timm ViT (full, frozen, LoRA, or LoRA over 4-bit weights) + conv decoder.

Config groups mirror the issue's YAML: ``backbone``, ``decoder``, ``heatmap``, ``lora``, ``quantization``.
Without ``lora``/``quantization`` (or with ``enabled: false``) the backbone is trained fully
(``backbone.freeze: false``) or frozen (``true``); the decoder always trains. Order for QLoRA: freeze,
inject LoRA, then quantize every remaining ``nn.Linear`` of the backbone (the LoRA ``base`` layers included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules.tracknet import MEAN, STD
from models.adapters.lora import count_parameters, inject_lora, load_lora, save_lora
from models.metrics.tracknet import (
    OUTCOMES,
    PEAK_METHODS,
    TrackNetMetrics,
    centroid_radius,
    detect_peaks,
    v3_label_centres,
)
from models.utils.atomic import atomic_path
from models.vision.tracknet import HeatmapConfig, TrackNetViT, heatmap_figure, heatmap_loss, prediction_figure
from models.vision.vit import freeze


@dataclass
class BackboneConfig:
    """``freeze``: freeze the ViT (only the decoder and adapters train); ``patch_size``: override (timm
    resamples pretrained filters); ``pretrained_file``: local timm weights, ``None`` = random init."""

    freeze: bool = True
    patch_size: int | None = 16
    pretrained_file: str | None = None


@dataclass
class DecoderConfig:
    """``channels[0]`` is the decoder input width (projected from the ViT width if different); one
    ``upsample`` factor per stage (``len(channels) - 1``)."""

    channels: list[int] = field(default_factory=lambda: [384, 256, 128, 64])
    upsample: list[int] = field(default_factory=lambda: [2, 2, 2])


@dataclass
class LoRAConfig:
    """LoRA on the backbone. ``target_modules: null`` = every attention and MLP linear of the ViT;
    ``task_type`` is recorded (hparams and adapter metadata) for PEFT-style bookkeeping. When enabled, only
    the adapters (and the biases ``bias`` selects) train in the backbone, whatever ``backbone.freeze`` says.
    ``r`` is an alias of ``lora_r`` (the key of the original TrackNet config); when both are given, ``lora_r``
    must be its default (16) or equal ``r``."""

    enabled: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: str | list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    task_type: str = "FEATURE_EXTRACTION"
    r: int | None = None

    def __post_init__(self) -> None:
        if self.r is not None:
            if self.lora_r not in (16, self.r):  # 16: lora_r's default, i.e. not set
                raise ValueError(f"lora.r ({self.r}) and lora.lora_r ({self.lora_r}) disagree: give one of them")
            self.lora_r, self.r = self.r, None


@dataclass
class QuantizationConfig:
    """4-bit frozen backbone linears (``models.quant``). ``compute_dtype: auto`` = bfloat16 where the device
    computes it natively, else float32. Double quantization: ``use_double_quant`` (transformers' name) and
    ``compress_statistics`` (bitsandbytes' name) are one switch; neither set = on, one set = its value, both
    set = on if either is true. ``save_dequantized``: one dequantization per step instead of two (keeps a
    dense copy of each weight from forward to backward)."""

    enabled: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    skip_modules: list[str] = field(default_factory=list)
    mode: Literal["manual", "hf"] = "manual"
    compress_statistics: bool | None = None
    use_double_quant: bool | None = None
    save_dequantized: bool = False


def _labels(batch: dict[str, Any], n: int) -> list[str]:
    """``<clip> frame <n>`` captions of the first ``n`` samples of a batch."""
    return [f"{c} frame {int(f)}" for c, f in zip(list(batch["clip"])[:n], batch["frame"][:n].tolist())]


def ensemble_weights(n: int) -> torch.Tensor:
    """TrackNetV3's position weights of the temporal ensemble for ``n`` windows: ``1, 2, ..`` rising from both
    ends to the middle (``n = 3``: ``1, 2, 1``; ``n = 8``: ``1, 2, 3, 4, 4, 3, 2, 1``), normalised to sum 1."""
    w = torch.tensor([min(i, n - 1 - i) + 1 for i in range(n)], dtype=torch.float32)
    return w / w.sum()


def _as(cls: type, value: Any) -> Any:
    """Accept the dataclass itself or a plain dict (``load_from_checkpoint``, Python callers)."""
    return cls(**value) if isinstance(value, dict) else value


class HeatmapTracker(L.LightningModule):
    """Heat-map tracker; see the module docstring and README ("TrackNet") for the config keys.

    Args:
        model_name: architecture; ``vit_heatmap`` (ViT + conv decoder) is the one available.
        pretrained_model_name: timm ViT name (``vit_small_patch16_dinov3``, ``vit_tiny_patch16_224``, ...).
        num_frames: frames stacked as input (must match the DataModule).
        backbone: ``freeze``, ``patch_size`` and the local ``pretrained_file`` of the ViT.
        decoder: ``channels`` and ``upsample`` factors of the conv decoder.
        heatmap: target size ``[W, H]``, ``sigma`` and ``mode`` (must equal the DataModule's).
        lora: LoRA on the backbone (``enabled``, ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``,
            ``bias``, ``task_type``).
        quantization: 4-bit backbone weights (``enabled``, ``quant_type``, ``compute_dtype``, ``skip_modules``,
            ``mode``, ``use_double_quant``, ``compress_statistics``, ``save_dequantized``).
        img_size: input frame size ``[W, H]``; ``None`` = ``heatmap.size``.
        loss: ``bce`` (weighted by ``pos_weight``) or ``focal`` (see :func:`models.vision.tracknet.heatmap_loss`).
        pos_weight: weight of positive pixels in the BCE loss.
        focal_gamma: focusing exponent of the focal loss.
        threshold: peak threshold on the sigmoid maps.
        tolerance: TP distance in pixels of ``tolerance_space``.
        tolerance_space: where distances are measured: ``reference`` = at ``reference_size`` (TrackNetV3: 4 px at
            512x288, comparable across heat-map sizes), ``source`` = each clip's source pixels, ``heatmap``.
        reference_size: ``[W, H]`` of ``tolerance_space: reference``.
        peak_method: ``centroid`` (weighted centroid over a window of ``3 sigma``, unbiased, adaptlab's default),
            ``component`` (bounding-box centre of the largest region above ``threshold``, half-pixel) or ``v3``
            (TrackNetV3's ``predict_location``/``evaluate`` to the pixel: that centre and the label both truncated
            to whole pixels, the label's box taken from V3's disk of radius ``heatmap.sigma`` (2.5 for Gaussian
            maps); exact at V3's 512x288 heat map).
        output_frames: ``last`` = one heat map per window (its last frame); ``all`` = one per input frame, as
            TrackNetV3 (trained on every labelled frame of the window; metrics use the last map; must equal
            ``data.output_frames``).
        temporal_ensemble: with ``output_frames: all``, ``predict`` combines each frame's maps from every window
            that holds it at its own position (up to ``num_frames``), as TrackNetV3's temporal ensemble: ``average``
            (or ``true``) = their mean; ``weight`` = V3's position weights (``1, 2, .., 2, 1`` normalised: the
            window's middle counts most) where all ``num_frames`` windows exist, the mean elsewhere (clip ends), as
            V3; ``false`` = off. Needs an ordered, single-device predict loader (the default).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adapter_path: folder written by :meth:`save_adapter` to load onto the freshly built model.
        num_log_images: samples in the TensorBoard image grids (0 = none): each validation epoch
            ``val/frames_pred_true`` (maps) and ``val/predictions`` (frames with the predicted ball as a red cross,
            the true ball as a green ring), and ``predict/predictions`` for the first predict batch.
    """

    def logged_metrics(self) -> list[str]:
        """Every name this module logs (``checkpoint.monitor`` is checked against it before training)."""
        return ["train/loss"] + [f"{split}/{name}" for split in ("val", "test") for name in
                                ("loss", "f1", "accuracy", "precision", "recall", *OUTCOMES)]

    def __init__(
        self,
        model_name: Literal["vit_heatmap"] = "vit_heatmap",
        pretrained_model_name: str = "vit_small_patch16_dinov3",
        backbone: BackboneConfig = BackboneConfig(),
        decoder: DecoderConfig = DecoderConfig(),
        heatmap: HeatmapConfig = HeatmapConfig(),
        lora: LoRAConfig | None = None,
        quantization: QuantizationConfig | None = None,
        num_frames: int = 3,
        img_size: tuple[int, int] | None = None,
        loss: Literal["bce", "focal"] = "bce",
        pos_weight: float = 100.0,
        focal_gamma: float = 2.0,
        threshold: float = 0.5,
        tolerance: float = 4.0,
        tolerance_space: Literal["reference", "source", "heatmap"] = "reference",
        reference_size: tuple[int, int] = (512, 288),
        peak_method: Literal["centroid", "component", "v3"] = "centroid",
        output_frames: Literal["last", "all"] = "last",
        temporal_ensemble: bool | Literal["average", "weight"] = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        adapter_path: str | None = None,
        num_log_images: int = 4,
    ) -> None:
        super().__init__()
        if model_name != "vit_heatmap":
            raise ValueError(f"model_name must be 'vit_heatmap', got {model_name!r}")
        if loss not in ("bce", "focal"):
            raise ValueError(f"loss must be 'bce' or 'focal', got {loss!r}")
        if tolerance_space not in ("reference", "source", "heatmap"):
            raise ValueError(f"tolerance_space must be 'reference', 'source' or 'heatmap', got {tolerance_space!r}")
        if output_frames not in ("last", "all"):
            raise ValueError(f"output_frames must be 'last' or 'all', got {output_frames!r}")
        if peak_method not in PEAK_METHODS:
            raise ValueError(f"peak_method must be one of {PEAK_METHODS}, got {peak_method!r}")
        if temporal_ensemble not in (False, True, "average", "weight"):
            raise ValueError(f"temporal_ensemble must be false, true, 'average' or 'weight', got {temporal_ensemble!r}")
        if temporal_ensemble and output_frames != "all":
            raise ValueError("temporal_ensemble needs output_frames: all (one map per input frame)")
        if len(reference_size) != 2 or min(reference_size) < 1:
            raise ValueError(f"reference_size must be [width, height] > 0, got {list(reference_size)}")
        backbone, decoder = _as(BackboneConfig, backbone), _as(DecoderConfig, decoder)
        heatmap = _as(HeatmapConfig, heatmap)
        lora = _as(LoRAConfig, lora) if lora is not None else LoRAConfig()
        quantization = _as(QuantizationConfig, quantization) if quantization is not None else QuantizationConfig()
        heatmap.validate()
        if quantization.enabled and not (backbone.freeze or lora.enabled):
            raise ValueError("quantization.enabled needs backbone.freeze: true or lora.enabled: true "
                             "(4-bit weights cannot be trained; LoRA trains on top of them)")
        if adapter_path is not None and not lora.enabled:
            raise ValueError("adapter_path needs lora.enabled: true with the same LoRA settings as when saved")
        if adapter_path is not None and not Path(adapter_path).is_dir():
            raise FileNotFoundError(f"adapter_path {adapter_path!r} is not a folder written by save_adapter")
        self.save_hyperparameters()
        self.heatmap_cfg, self.lora_cfg, self.quant_cfg = heatmap, lora, quantization
        size = tuple(img_size) if img_size is not None else tuple(heatmap.size)
        if backbone.patch_size is not None and (size[0] % backbone.patch_size or size[1] % backbone.patch_size):
            patch = backbone.patch_size
            raise ValueError(f"model.img_size {list(size)} ([W, H]; default: heatmap.size) is not a multiple of "
                             f"model.backbone.patch_size ({patch}): the last {size[0] % patch} columns and "
                             f"{size[1] % patch} rows would be silently dropped")
        self.model = TrackNetViT(pretrained_model_name, (size[1], size[0]), num_frames, backbone.pretrained_file,
                                 backbone.patch_size, decoder.channels, decoder.upsample, tuple(heatmap.size),
                                 num_frames if output_frames == "all" else 1)
        vit = self.model.backbone
        if backbone.freeze:
            freeze(vit)
        self.lora_modules: list[str] = []
        if lora.enabled:
            self.lora_modules = inject_lora(vit, lora.target_modules, r=lora.lora_r, lora_alpha=lora.lora_alpha,
                                            lora_dropout=lora.lora_dropout, bias=lora.bias)
        self.quantized_modules: list[str] = []
        if quantization.enabled:
            from models.quant import quantize_model  # lazy: only QLoRA configs need it

            self.quantized_modules = quantize_model(
                vit, quant_type=quantization.quant_type, compute_dtype=quantization.compute_dtype,
                skip_modules=tuple(quantization.skip_modules), mode=quantization.mode,
                use_double_quant=quantization.use_double_quant, compress_statistics=quantization.compress_statistics,
                save_dequantized=quantization.save_dequantized,
            )
        if adapter_path is not None:
            self.load_adapter(adapter_path)
        self.peak_radius = centroid_radius(heatmap.sigma, heatmap.mode)
        self.val_metrics = TrackNetMetrics(threshold, tolerance, peak_method, self.peak_radius)
        self.test_metrics = TrackNetMetrics(threshold, tolerance, peak_method, self.peak_radius)
        self._val_images: tuple[torch.Tensor, ...] | None = None

    def trained_weights_source(self) -> str | None:
        """``adapter_path``, when given (``TrainedWeights`` protocol: ``predict`` then needs no ``--ckpt_path``)."""
        return self.hparams.adapter_path

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model(frames)

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """The DataModule's samples must fit the model (``callbacks.protocols.DataCompatibility``; ``cli.py`` calls
        it before any run folder exists, :meth:`setup` again for Python callers): stacked frames
        (``data.num_frames`` = ``model.num_frames``), target maps (``data.heatmap`` = ``model.heatmap``: the model's
        output size, sigma, mode), maps per sample (``output_frames``) and input size (``data.frame_size`` =
        ``model.img_size``, both ``heatmap.size`` by default). Any DataModule without ``heatmap`` is not checked."""
        dm = datamodule
        if not hasattr(dm, "heatmap"):
            return
        hp, dhp = self.hparams, dm.hparams
        if dhp.get("num_frames") is not None and dhp.num_frames != hp.num_frames:
            raise ValueError(f"data.num_frames ({dhp.num_frames}) differs from model.num_frames ({hp.num_frames}): "
                             f"the model takes {3 * hp.num_frames} input channels ({hp.num_frames} stacked RGB frames)")
        mine = (list(self.heatmap_cfg.size), float(self.heatmap_cfg.sigma), self.heatmap_cfg.mode,
                self.heatmap_cfg.centre)
        theirs = (list(dm.heatmap.size), float(dm.heatmap.sigma), dm.heatmap.mode, dm.heatmap.centre)
        if mine[0] != theirs[0]:
            raise ValueError(f"data.heatmap.size {theirs[0]} differs from model.heatmap.size {mine[0]} (the model's "
                             "output maps, [W, H])")
        if mine != theirs:
            raise ValueError(f"data.heatmap {theirs} differs from model.heatmap {mine} (size, sigma, mode, centre)")
        if dhp.get("output_frames", "last") != hp.output_frames:
            raise ValueError(f"data.output_frames={dhp.get('output_frames', 'last')!r} differs from "
                             f"model.output_frames={hp.output_frames!r}")
        size = list(hp.img_size) if hp.img_size is not None else list(self.heatmap_cfg.size)
        if list(dm.frame_size) != size:
            raise ValueError(f"data.frame_size {list(dm.frame_size)} differs from model.img_size {size} ([W, H]; "
                             "both default to heatmap.size)")

    def setup(self, stage: str) -> None:
        """Fail before training when the DataModule disagrees with the model's heat map or input."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            self.check_data(dm)

    def on_fit_start(self) -> None:
        if self.logger is not None:
            self.logger.log_hyperparams(self.hparams, {"params/trainable": count_parameters(self),
                                                       "params/total": count_parameters(self, False)})

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss; with ``mask`` ``(B, n)`` (``output_frames: all``) the mean over the maps it marks."""
        hp = self.hparams
        if mask is None:
            return heatmap_loss(logits.float(), target, hp.loss, hp.pos_weight, hp.focal_gamma)
        per_map = heatmap_loss(logits.float(), target, hp.loss, hp.pos_weight, hp.focal_gamma, "none").mean((2, 3))
        return (per_map * mask).sum() / mask.sum().clamp_min(1)

    def _batch_loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        if self.hparams.output_frames == "all":
            return self._loss(logits, batch["heatmaps"], batch["target_mask"].float())
        return self._loss(logits, batch["heatmap"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._batch_loss(self(batch["frames"]), batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["frames"].shape[0])
        return loss

    def distance_scale(self, src_size: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` factors from heat-map pixels to the pixels ``tolerance`` is measured in."""
        hm = torch.tensor(self.heatmap_cfg.size, dtype=torch.float32, device=src_size.device)
        space = self.hparams.tolerance_space
        if space == "source":
            return src_size.float() / hm
        ref = torch.tensor(self.hparams.reference_size, dtype=torch.float32, device=src_size.device)
        scale = ref / hm if space == "reference" else torch.ones(2, device=src_size.device)
        return scale.expand(src_size.shape[0], 2)

    def peaks(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xy, found)`` of probability maps with this model's peak method (heat-map pixels)."""
        return detect_peaks(probs, self.hparams.threshold, self.hparams.peak_method, self.peak_radius)

    def _eval_step(self, batch: dict[str, Any], metrics: TrackNetMetrics, prefix: str) -> torch.Tensor:
        logits = self(batch["frames"])
        probs = torch.sigmoid(logits[:, -1:].float())  # the labelled (last) frame's map
        true_xy, visible = batch["xy"], batch["visible"]
        if self.hparams.peak_method == "v3":  # V3's ground truth: the box centre of its disk at the truncated label
            if "xy_v3" not in batch:
                raise ValueError("peak_method: v3 needs batches with 'xy_v3' (the truncated label, as "
                                 "TrackNetDataModule gives)")
            hm = self.heatmap_cfg
            true_xy, visible = v3_label_centres(batch["xy_v3"], visible, tuple(hm.size),
                                                hm.sigma if hm.mode == "disk" else 2.5)
            true_xy, visible = true_xy.to(probs.device), visible.to(probs.device)
        metrics.update(probs, true_xy, visible, self.distance_scale(batch["src_size"]))
        self.log(f"{prefix}/loss", self._batch_loss(logits, batch), prog_bar=True, sync_dist=True,
                 batch_size=batch["frames"].shape[0])
        return probs

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        probs = self._eval_step(batch, self.val_metrics, "val")
        n = self.hparams.num_log_images
        if batch_idx == 0 and n > 0:
            self._val_images = (batch["frames"][:n], probs[:n], batch["heatmap"][:n], batch["xy"][:n],
                                batch["visible"][:n], _labels(batch, n))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def _log_metrics(self, metrics: TrackNetMetrics, prefix: str) -> None:
        values = metrics.compute()
        self.log(f"{prefix}/f1", values.pop("f1"), prog_bar=True)
        self.log_dict({f"{prefix}/{k}": v.float() for k, v in values.items()})
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")
        log_images = isinstance(self.logger, TensorBoardLogger) and not self.trainer.sanity_checking
        if self._val_images is not None and log_images and self.trainer.is_global_zero:
            frames, probs, target, true_xy, visible, labels = self._val_images
            xy, found = self.peaks(probs)
            to_img = self._heatmap_to_image(frames)
            pred_img, true_img = xy * to_img, true_xy.to(to_img) * to_img
            self.logger.experiment.add_figure("val/frames_pred_true", heatmap_figure(
                frames, probs, target, MEAN, STD, pred_img, found, true_img, visible, labels), self.global_step)
            self.logger.experiment.add_figure("val/predictions", prediction_figure(
                frames, pred_img, found, MEAN, STD, true_img, visible, labels), self.global_step)
        self._val_images = None

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Ball position per frame at the clip's source resolution (collected by ``TrackNetPredictionWriter``)."""
        all_probs = torch.sigmoid(self(batch["frames"]).float())
        probs = all_probs[:, -1:]
        xy, found = self.peaks(probs)
        n = self.hparams.num_log_images
        if batch_idx == 0 and n > 0 and isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            frames = batch["frames"][:n]
            fig = prediction_figure(frames, xy[:n] * self._heatmap_to_image(frames), found[:n], MEAN, STD,
                                    labels=_labels(batch, n))
            self.logger.experiment.add_figure("predict/predictions", fig, self.global_step)
        if self.hparams.temporal_ensemble:
            last = batch_idx == int(self.trainer.num_predict_batches[dataloader_idx]) - 1
            return self._ensemble_step(all_probs, batch, last and "clip_end" not in batch)
        return self._rows(list(batch["clip"]), batch["frame"], xy, found, batch["src_size"])

    def _rows(self, clips: list[str], frames: torch.Tensor, xy: torch.Tensor, found: torch.Tensor,
              src_size: torch.Tensor) -> dict[str, Any]:
        w, h = self.heatmap_cfg.size  # float64, as TrackNetV3 scales its whole-pixel centres (int(cx * W_src / W))
        scale = src_size.double().cpu() / torch.tensor([w, h], dtype=torch.float64)
        xy = xy.double().cpu()
        xy = torch.where(found.cpu()[:, None], xy * scale, torch.zeros_like(xy))
        return {"clip": clips, "frame": frames.cpu(), "visibility": found.long().cpu(), "xy": xy.cpu()}

    def on_predict_epoch_start(self) -> None:
        self._ens: dict[int, list[Any]] = {}  # frame -> [map sum, count, src_size, weighted sum] of the clip
        self._ens_clip: str | None = None

    def _ensemble_step(self, probs: torch.Tensor, batch: dict[str, Any], last_batch: bool) -> dict[str, Any]:
        """Temporal ensemble: the map at window position ``p`` of the window ending at frame ``L`` predicts frame
        ``L - n + 1 + p`` (positions holding a repeat or a gap fill are left out); a frame is final once the
        window it starts has been seen (or its clip ends: ``clip_end``), and comes out as the peak of its averaged
        maps (``weight``: V3's position weights when all ``n`` windows hold it)."""
        n = probs.shape[1]
        weights = ensemble_weights(n).to(probs)
        weighted = self.hparams.temporal_ensemble == "weight"
        done: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []

        def flush(upto: int | None) -> None:
            for g in sorted(self._ens):
                if upto is None or g <= upto:
                    total, count, src, wsum = self._ens.pop(g)
                    done.append((self._ens_clip, g, wsum if weighted and count == n else total / count, src))

        for b in range(probs.shape[0]):
            clip, end = batch["clip"][b], int(batch["frame"][b])
            if clip != self._ens_clip:
                flush(None)
                self._ens_clip = clip
            for pos, g in enumerate(batch["window"][b].tolist()):
                if g != end - n + 1 + pos:
                    continue
                entry = self._ens.setdefault(g, [torch.zeros_like(probs[b, pos]), 0, batch["src_size"][b],
                                                 torch.zeros_like(probs[b, pos])])
                entry[0] += probs[b, pos]
                entry[1] += 1
                entry[3] += weights[pos] * probs[b, pos]
            flush(None if "clip_end" in batch and bool(batch["clip_end"][b]) else end - n + 1)
        if last_batch:
            flush(None)
        if not done:
            none = torch.zeros(0, dtype=torch.long)
            return {"clip": [], "frame": none, "visibility": none, "xy": torch.zeros(0, 2)}
        maps = torch.stack([d[2] for d in done])[:, None]
        xy, found = self.peaks(maps)
        return self._rows([d[0] for d in done], torch.tensor([d[1] for d in done]), xy, found,
                          torch.stack([d[3] for d in done]))

    def _heatmap_to_image(self, frames: torch.Tensor) -> torch.Tensor:
        """Factors ``(2,)`` from heat-map pixels to input-frame pixels."""
        w, h = self.heatmap_cfg.size
        return torch.tensor([frames.shape[-1] / w, frames.shape[-2] / h], device=frames.device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # Adapter-only checkpoints -------------------------------------------------------------------------

    def save_adapter(self, directory: str | Path) -> Path:
        """Write ``adapter.safetensors`` (LoRA of the backbone, via ``save_lora``) and ``decoder.safetensors``
        (the trained decoder): everything needed on top of the base ViT weights."""
        from safetensors.torch import save_file

        if not self.lora_cfg.enabled:
            raise ValueError("save_adapter needs lora.enabled: true")
        directory = Path(directory)
        meta = {"task_type": self.lora_cfg.task_type, "pretrained_model_name": self.hparams.pretrained_model_name,
                **{f"lora.{k}": v for k, v in asdict(self.lora_cfg).items()}}
        save_lora(self.model.backbone, directory / "adapter.safetensors", bias=self.lora_cfg.bias, metadata=meta)
        with atomic_path(directory / "decoder.safetensors") as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.model.decoder.state_dict().items()}, str(tmp))
        return directory

    def load_adapter(self, directory: str | Path) -> dict[str, str]:
        """Load a folder from :meth:`save_adapter` onto this (fresh) model; returns the adapter metadata."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = load_lora(self.model.backbone, directory / "adapter.safetensors")
        decoder_file = directory / "decoder.safetensors"
        if not decoder_file.is_file():
            raise FileNotFoundError(f"decoder weights not found: {decoder_file}")
        self.model.decoder.load_state_dict(load_file(str(decoder_file)))
        return meta

    def on_train_end(self) -> None:
        """With LoRA, also leave an adapter-only checkpoint in ``<log_dir>/adapter``."""
        if self.lora_cfg.enabled and self.trainer.is_global_zero and self.trainer.log_dir is not None:
            self.save_adapter(Path(self.trainer.log_dir) / "adapter")
