"""Segnet: Simple-BEV's multi-camera BEV segmentation network.

images -> encoder (stride 8) -> lift into the Z x Y x X grid (mean over cameras) -> fold Y into
channels (+ radar / lidar grids) -> BEV compressor -> ResNet-18 decoder -> heads.

Differences from Simple-BEV, on purpose:
- no ``rand_flip`` inside the model: the data pipeline flips images (negative fx) and the
  reference frame (mirrored ``cams_T_ref``) consistently with the targets, and the lift uses the
  matrices as given;
- the camera average uses an explicit visibility mask (Simple-BEV used ``|feat| > 0``);
- with ``do_rgbcompress=False`` the Y axis is averaged (Simple-BEV summed; the decoder's first
  conv + batch norm absorb the constant factor);
- with ``radar_features='rich'`` radar occupancy and mean features are folded over Y like
  everything else, velocities rotated into the reference frame; ``'simplebev'`` (the default) is
  Simple-BEV's radar input exactly: occupancy collapsed to 1 channel, or with metaradar 16 raw
  features per voxel (one point's, no occupancy) folded over Y;
- height slices are folded into channels y-major (channel y*C + c; Simple-BEV's order is c*Y + y);
- the centre head returns logits (the loss applies the sigmoid); runs on any device.

``compat='simplebev'`` undoes the differences that change what a set of weights computes, so that
Simple-BEV's released checkpoints (converted by ``bevtrain.model.simplebev_compat``) give its
numbers: its intrinsics scaling and lift (``lift.lift_simplebev``: sampling offsets, zero padding,
``|feat| > 0`` camera mean), the Y sum without rgb compression, its radar input
(``radar_features='simplebev'`` required), and efficientnet_pytorch's static "SAME" padding and
batch-norm settings for effb0/effb4. Channel order inside the compressor input stays ours
(y-major); the checkpoint converter permutes Simple-BEV's (channel-major) weights.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from bevtrain.config import ModelConfig
from bevtrain.geometry import Vox_util
from bevtrain.model.decoder import Decoder
from bevtrain.model.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_encoder,
    use_simplebev_effnet_conventions,
)
from bevtrain.model.lift import (
    feature_pix_T_ref,
    fold_y_into_channels,
    lift_features,
    lift_reference,
    lift_simplebev,
    simplebev_feature_pix_T_ref,
)

RADAR_FEAT_DIM = 16  # Simple-BEV's metaradar feature count
RADAR_FEATURES = ("simplebev", "rich")
# "reference" (grid_sample over every voxel and camera) exists for tests and benchmarks.
LIFTS = ("sparse", "reference")
COMPAT_MODES = ("none", "simplebev")


def _padding_mask(count: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) True for the first count[b] entries of each padded point list."""
    return torch.arange(n, device=count.device).unsqueeze(0) < count.reshape(-1, 1)


def check_model_settings(model: ModelConfig, lift_impl: str, radar_feat_dim: int) -> None:
    """ValueError naming the setting a Segnet cannot be built with."""
    if model.use_metaradar and not model.use_radar:
        raise ValueError("use_metaradar=True needs use_radar=True (metaradar adds features to radar)")
    if model.radar_features not in RADAR_FEATURES:
        raise ValueError(f"radar_features={model.radar_features!r}; valid: {', '.join(RADAR_FEATURES)}")
    if lift_impl not in LIFTS:
        raise ValueError(f"lift_impl={lift_impl!r}; valid: {', '.join(LIFTS)}")
    if model.compat not in COMPAT_MODES:
        raise ValueError(f"compat={model.compat!r}; valid: {', '.join(COMPAT_MODES)}")
    if model.compat == "simplebev":
        if model.use_radar and model.use_lidar:
            raise ValueError("compat='simplebev': Simple-BEV's Segnet takes radar or lidar, not both")
        if model.use_radar and (model.radar_features != "simplebev" or radar_feat_dim != RADAR_FEAT_DIM):
            raise ValueError("compat='simplebev' needs Simple-BEV's radar input: "
                             f"radar_features='simplebev' with {RADAR_FEAT_DIM} metaradar channels")


class Segnet(nn.Module):
    """Multi-camera BEV segmentation network.

    Args:
        model: the model section of a config (``ModelConfig.make(...)`` outside a run):
            Z, Y, X, bounds, scene_centroid: the voxel grid (``self.vox_util``, which also voxelises
                radar / lidar);
            encoder_type: one of ``ENCODER_TYPES`` (res101, res50, res18, effb0, effb4);
            encoder_weights: 'imagenet' | 'none' | path to a torchvision state dict;
            latent_dim: channels of image features, BEV features and the 'feat' output;
            use_radar / use_metaradar / radar_features: radar as input (see ``point_bev_inputs``);
            use_lidar: lidar occupancy per voxel, folded likewise;
            do_rgbcompress: fold Y into channels and compress (True), or average over Y (False);
            compat: 'none' (bevtrain's exact conventions) or 'simplebev' (Simple-BEV's forward pass,
                see the module docstring; ``lift_impl`` is then unused);
            classes: the named outputs (``bevtrain.classes``), one segmentation logit each, in order;
            map_loss: the loss of the map-layer channels (``bevtrain.losses``).
        lift_impl: 'sparse' (fast) or 'reference' (grid_sample over all voxels; for comparison).
        radar_feat_dim: radar feature columns after xyz (metaradar).

    ``forward(images, pix_T_cams, cams_T_ref, radar=None, radar_count=None, lidar=None,
    lidar_count=None)``: images uint8 (B, S, 3, H, W) RGB; pix_T_cams (B, S, 4, 4) for the images
    as given; cams_T_ref (B, S, 4, 4), mirrors allowed; radar (B, R, 3+F) / lidar (B, L, 4+) points
    in the reference frame, padded, with counts (B,). Returns a dict of (B, ., Z, X) maps:
    'seg' (C logits, one per class of ``self.classes``), 'center' (1, logits), 'offset' (2, cells),
    'feat' (latent_dim).
    Run ``model.to(memory_format=torch.channels_last)`` for a channels-last network end to end.
    """

    def __init__(
        self, model: ModelConfig, *, lift_impl: str = "sparse", radar_feat_dim: int = RADAR_FEAT_DIM
    ):
        super().__init__()
        check_model_settings(model, lift_impl, radar_feat_dim)
        self.compat = model.compat
        self.Z, self.Y, self.X = model.Z, model.Y, model.X
        self.lift_impl = lift_impl
        self.vox_util = Vox_util(model.Z, model.Y, model.X, scene_centroid=model.scene_centroid,
                                 bounds=model.bounds)
        self.encoder_type = model.encoder_type
        self.latent_dim = latent_dim = model.latent_dim
        self.use_radar, self.use_lidar = model.use_radar, model.use_lidar
        self.use_metaradar = model.use_metaradar
        self.radar_feat_dim = radar_feat_dim
        self.radar_features = model.radar_features
        self.do_rgbcompress = model.do_rgbcompress

        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
        self.encoder = build_encoder(model.encoder_type, latent_dim, model.encoder_weights)
        if model.compat == "simplebev" and model.encoder_type.startswith("eff"):
            use_simplebev_effnet_conventions(self.encoder, model.encoder_type)

        self.point_channels = self.point_bev_channels()
        self.uses_compressor = model.do_rgbcompress or self.point_channels > 0
        if self.uses_compressor:
            self.bev_compressor = nn.Sequential(
                nn.Conv2d(latent_dim * model.Y + self.point_channels, latent_dim, kernel_size=3, padding=1,
                          bias=False),
                nn.InstanceNorm2d(latent_dim),
                nn.GELU(),
            )
        self.classes = model.outputs  # one segmentation logit per named output
        self.map_loss = model.map_loss
        self.decoder = Decoder(latent_dim, n_classes=len(self.classes))

        # Learned uncertainty weights of the three losses (Simple-BEV's names); in the model so
        # that DDP keeps them synchronised.
        self.ce_weight = nn.Parameter(torch.tensor(0.0))
        self.center_weight = nn.Parameter(torch.tensor(0.0))
        self.offset_weight = nn.Parameter(torch.tensor(0.0))
        if any(c.is_map for c in self.classes):
            # Map layers have a loss of their own scale; only models with map layers carry its weight,
            # so vehicle-only models keep Simple-BEV's state-dict names.
            self.map_weight = nn.Parameter(torch.tensor(0.0))

    def _memory_format(self) -> torch.memory_format:
        channels_last = self.decoder.first_conv.weight.is_contiguous(memory_format=torch.channels_last)
        return torch.channels_last if channels_last else torch.contiguous_format

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 1]) (N, 3, H, W) RGB -> ImageNet-normalised float."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        return (x - self.mean) / self.std

    def point_bev_channels(self) -> int:
        """Compressor input channels from radar / lidar (after the latent_dim * Y camera channels).
        Simple-BEV's radar: 1 (occupancy collapsed over Y) or, with metaradar, 16 * Y (features per
        height slice, no occupancy); rich radar: (1 + 16 with metaradar) * Y; lidar: Y."""
        n = 0
        if self.use_radar:
            if self.radar_features == "simplebev":
                n += self.radar_feat_dim * self.Y if self.use_metaradar else 1
            else:
                n += (1 + (self.radar_feat_dim if self.use_metaradar else 0)) * self.Y
        if self.use_lidar:
            n += self.Y
        return n

    def point_bev_inputs(self, radar=None, radar_count=None, lidar=None, lidar_count=None) -> list:
        """Radar / lidar BEV inputs (B, k, Z, X) in fp32, in the order the compressor expects."""
        maps = []
        if self.use_radar:
            if radar is None or radar_count is None:
                raise ValueError("use_radar=True: pass radar (B, R, 3+F) and radar_count (B,)")
            valid = _padding_mask(radar_count, radar.shape[1])
            xyz = radar[..., :3].float()
            feats = radar[..., 3:]
            if self.use_metaradar and feats.shape[-1] != self.radar_feat_dim:
                raise ValueError(
                    f"use_metaradar: radar has {feats.shape[-1]} feature channels after xyz, the model "
                    f"was built with radar_feat_dim={self.radar_feat_dim}"
                )
            if self.radar_features == "simplebev" and self.use_metaradar:
                grid = self.vox_util.voxelize_features_simplebev(xyz, feats, valid)  # (B, 16, Z, Y, X)
                maps.append(fold_y_into_channels(grid))
            elif self.radar_features == "simplebev":
                occ = self.vox_util.voxelize_xyz_simplebev(xyz, valid)  # (B, 1, Z, Y, X)
                maps.append(occ.amax(dim=3))  # Simple-BEV: sum over Y, clamped to [0, 1]
            else:
                maps.append(fold_y_into_channels(self.vox_util.voxelize_xyz(xyz, valid)))
                if self.use_metaradar:
                    maps.append(fold_y_into_channels(self.vox_util.voxelize_features(xyz, feats, valid)))
        if self.use_lidar:
            if lidar is None or lidar_count is None:
                raise ValueError("use_lidar=True: pass lidar (B, L, 4) and lidar_count (B,)")
            valid = _padding_mask(lidar_count, lidar.shape[1])
            maps.append(fold_y_into_channels(self.vox_util.voxelize_xyz(lidar[..., :3].float(), valid)))
        return maps

    def forward(
        self,
        images: torch.Tensor,
        pix_T_cams: torch.Tensor,
        cams_T_ref: torch.Tensor,
        radar: torch.Tensor | None = None,
        radar_count: torch.Tensor | None = None,
        lidar: torch.Tensor | None = None,
        lidar_count: torch.Tensor | None = None,
    ) -> Dict[str, torch.Tensor]:
        B, S, C, H, W = images.shape
        if C != 3:
            raise ValueError(f"images must be (B, S, 3, H, W) RGB, got {tuple(images.shape)}")
        fmt = self._memory_format()

        x = self.normalize_images(images.reshape(B * S, 3, H, W)).contiguous(memory_format=fmt)
        feats = self.encoder(x)  # (B*S, latent, Hf, Wf)
        Hf, Wf = feats.shape[-2:]
        feats = feats.reshape(B, S, self.latent_dim, Hf, Wf)

        with torch.autocast(device_type=images.device.type, enabled=False):
            if self.compat == "simplebev":
                featpix_T_ref = simplebev_feature_pix_T_ref(pix_T_cams, cams_T_ref, (H, W), (Hf, Wf))
                vox = lift_simplebev(feats, featpix_T_ref, self.vox_util)
            elif self.lift_impl == "sparse":
                featpix_T_ref = feature_pix_T_ref(pix_T_cams, cams_T_ref, (H, W), (Hf, Wf))
                layout = "channels_last" if fmt == torch.channels_last else "channels_first"
                vox = lift_features(feats, featpix_T_ref, self.vox_util, layout)  # (B, latent, Z, Y, X)
            else:
                featpix_T_ref = feature_pix_T_ref(pix_T_cams, cams_T_ref, (H, W), (Hf, Wf))
                vox = lift_reference(feats, featpix_T_ref, self.vox_util)
            point_maps = self.point_bev_inputs(radar, radar_count, lidar, lidar_count)

        if self.uses_compressor:
            folded = [fold_y_into_channels(vox)] + [m.to(vox.dtype) for m in point_maps]
            bev_in = folded[0] if len(folded) == 1 else torch.cat(folded, dim=1)
            bev = self.bev_compressor(bev_in.contiguous(memory_format=fmt))
        elif self.compat == "simplebev":
            bev = vox.sum(dim=3).contiguous(memory_format=fmt)  # Simple-BEV sums over Y
        else:
            bev = vox.mean(dim=3).contiguous(memory_format=fmt)
        return self.decoder(bev)  # (B, C|1|2|latent, Z, X)
