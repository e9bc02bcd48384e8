"""The random augmentation parameters of the DALI loader, fed to its pipeline through an
``external_source`` callback: the same draw (`transforms.sample_params`) and geometry
(`transforms.paste_regions`, `canvas_matrix`) as the torch loader, one batch per call."""

from __future__ import annotations

import numpy as np

from trainer.data.transforms import (
    P_HUE,
    P_MIX,
    P_SAT,
    P_VAL,
    AugmentConfig,
    canvas_matrix,
    identity_params,
    mix_partner,
    partner_ids,
    paste_regions,
    sample_params,
)


class ParamSource:
    """external_source callback: per-sample augmentation parameters of each batch.

    Outputs per sample: params, mosaic tile ids, paste regions (3), 2x3 matrix, hue, sat, value;
    with mixup also the partner's params, tile ids, paste regions, matrix, and the weight r (the
    partner is another sample of the batch, made with its own mosaic and warp; r = 1: no mixup)."""

    def __init__(self, cfg: AugmentConfig, imgsz: int, batch: int, seed: list[int]):
        self.cfg, self.imgsz, self.batch, self.mosaic = cfg, imgsz, batch, True
        self.rng = np.random.default_rng(seed)
        self.num_outputs = 9 + (7 if cfg.mixup > 0 else 0)

    def __call__(self) -> tuple[list[np.ndarray], ...]:
        s = self.imgsz
        out: tuple[list[np.ndarray], ...] = tuple([] for _ in range(self.num_outputs))
        for i in range(self.batch):
            p = sample_params(self.rng, self.cfg, s, mosaic=self.mosaic) if not self.cfg.is_off else identity_params(s)
            vals = [*self._paste(p, i), np.float32(p[P_HUE]), np.float32(p[P_SAT]), np.float32(p[P_VAL])]
            if self.num_outputs > 9:
                j = mix_partner(p, i, self.batch)
                p2 = identity_params(s) if j is None else sample_params(self.rng, self.cfg, s, mosaic=self.mosaic,
                                                                        mix=False)
                vals += [*self._paste(p2, i if j is None else j), np.float32(p[P_MIX])]
            for lst, v in zip(out, vals, strict=True):
                lst.append(np.asarray(v))
        return out

    def _paste(self, p: np.ndarray, own: int) -> list[np.ndarray]:
        """params, tile ids, the three paste-region arrays and the 2x3 matrix of one sample."""
        q = paste_regions(p, self.imgsz)
        ids = np.asarray(partner_ids(p, own, self.batch), dtype=np.int32)
        regions = [np.ascontiguousarray(q[:, k]) for k in range(3)]  # in-anchors, shapes, out-anchors
        return [p, ids, *regions, canvas_matrix(p, self.imgsz).astype(np.float32)]
