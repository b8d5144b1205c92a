"""A plain re-statement of the SegFormer-release MiT and the reference AFA network, for tests.

Written from the spec (AFA.md §1–§2) in the simplest form: explicit softmax attention,
separate symmetrisation of all 16 maps, the reference's module names. Tests load its
state dicts into ``afa.models`` and compare outputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.heads, self.sr_ratio = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, h, w):
        b, n, d = x.shape
        hd = d // self.heads
        q = self.q(x).reshape(b, n, self.heads, hd).permute(0, 2, 1, 3)
        src = x
        if self.sr_ratio > 1:
            src = self.norm(self.sr(x.permute(0, 2, 1).reshape(b, d, h, w)).reshape(b, d, -1).permute(0, 2, 1))
        kv = self.kv(src).reshape(b, -1, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        logits = q @ k.transpose(-2, -1)
        attn = (logits * hd**-0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out), logits


class RefDW(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dwconv = nn.Conv2d(d, d, 3, 1, 1, groups=d)


class RefMlp(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.dwconv = RefDW(hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x, h, w):
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dwconv.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class RefBlock(nn.Module):
    def __init__(self, d, heads, sr):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = RefAttention(d, heads, sr)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = RefMlp(d, 4 * d)

    def forward(self, x, h, w):
        a, logits = self.attn(self.norm1(x), h, w)
        x = x + a
        return x + self.mlp(self.norm2(x), h, w), logits


class RefPatchEmbed(nn.Module):
    def __init__(self, cin, d, k, s):
        super().__init__()
        self.proj = nn.Conv2d(cin, d, k, s, k // 2)
        self.norm = nn.LayerNorm(d)


class RefMiT(nn.Module):
    """SegFormer-release key layout; no stochastic depth (eval only)."""

    def __init__(self, dims, heads, depths, srs=(8, 4, 2, 1), strides=(4, 2, 2, 1), with_head=False):
        super().__init__()
        cin = 3
        for i in range(4):
            k = 7 if i == 0 else 3
            setattr(self, f"patch_embed{i + 1}", RefPatchEmbed(cin, dims[i], k, strides[i]))
            setattr(self, f"block{i + 1}", nn.ModuleList([RefBlock(dims[i], heads[i], srs[i]) for _ in range(depths[i])]))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i], eps=1e-6))
            cin = dims[i]
        if with_head:
            self.head = nn.Linear(dims[-1], 1000)
        for p in self.parameters():  # non-trivial values everywhere, norms included
            nn.init.normal_(p, 0.0, 0.05) if p.dim() > 1 else nn.init.uniform_(p, 0.5, 1.5)

    def forward(self, x):
        feats, attns = [], []
        for i in range(1, 5):
            pe = getattr(self, f"patch_embed{i}")
            x = pe.proj(x)
            b, c, h, w = x.shape
            t = pe.norm(x.flatten(2).transpose(1, 2))
            for blk in getattr(self, f"block{i}"):
                t, logits = blk(t, h, w)
                attns.append(logits)
            t = getattr(self, f"norm{i}")(t)
            x = t.reshape(b, h, w, -1).permute(0, 3, 1, 2)
            feats.append(x)
        return feats, attns


class RefLinear(nn.Module):
    def __init__(self, cin, e):
        super().__init__()
        self.proj = nn.Linear(cin, e)


class RefConvBN(nn.Module):
    def __init__(self, cin, e):
        super().__init__()
        self.conv = nn.Conv2d(cin, e, 1, bias=False)
        self.bn = nn.BatchNorm2d(e)


class RefDecoder(nn.Module):
    def __init__(self, dims, k, e=256):
        super().__init__()
        for i, d in enumerate(dims, 1):
            setattr(self, f"linear_c{i}", RefLinear(d, e))
        self.linear_fuse = RefConvBN(4 * e, e)
        self.linear_pred = nn.Conv2d(e, k, 1)

    def forward(self, feats):
        size = feats[0].shape[2:]
        outs = []
        for i in (4, 3, 2, 1):
            f = feats[i - 1]
            b, c, h, w = f.shape
            y = getattr(self, f"linear_c{i}").proj(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
            outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        y = F.relu(self.linear_fuse.bn(self.linear_fuse.conv(torch.cat(outs, 1))))
        return self.linear_pred(y)


class RefAFA(nn.Module):
    """Reference-AFA key layout: encoder, decoder, attn_proj, classifier."""

    def __init__(self, dims, heads, depths, num_classes):
        super().__init__()
        self.encoder = RefMiT(dims, heads, depths)
        self.decoder = RefDecoder(dims, num_classes + 1)
        self.attn_proj = nn.Conv2d(2 * heads[-1], 1, 1, bias=True)
        self.classifier = nn.Conv2d(dims[-1], num_classes, 1, bias=False)
        for m in self.decoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        feats, attns = self.encoder(x)
        seg = self.decoder(feats)
        cat = torch.cat(attns[-2:], dim=1)
        cat = cat + cat.permute(0, 1, 3, 2)
        affinity = torch.sigmoid(self.attn_proj(cat))[:, 0]
        cls = self.classifier(F.adaptive_max_pool2d(feats[-1], 1)).flatten(1)
        cam = F.conv2d(feats[-1], self.classifier.weight)
        return cls, seg, affinity, cam, feats
