"""The tilings of the fp8 matmul kernels (:mod:`fxscale.kernels.triton_fp8`), which the autotuner
(:mod:`fxscale.kernels.cuda`) tries: plain data, importable without Triton or a GPU.

>>> from fxscale.kernels.tilings import CONFIGS_LARGE, small_configs
>>> CONFIGS_LARGE[0]
tmas_128x256x128_s3w8g8
>>> small_configs(8)[0]
ptr_16x64x256_s4w4g1k4
"""

from __future__ import annotations


class Config:
    """One tiling of the matmul kernels: ``tma`` picks the persistent TMA kernel (``subtile``:
    epilogue in two halves; ``flatten``: flattened tile loop), else the pointer kernel
    (``split_k``: K split over that many programs, summed with atomics)."""

    __slots__ = ("bk", "bm", "bn", "flatten", "group_m", "split_k", "stages", "subtile", "tma", "warps")

    def __init__(self, bm, bn, bk, stages, warps, *, group_m=8, tma=True, flatten=False, subtile=False,
                 split_k=1):
        self.bm, self.bn, self.bk, self.group_m = bm, bn, bk, group_m
        self.stages, self.warps, self.tma, self.flatten = stages, warps, tma, flatten
        self.subtile, self.split_k = subtile, split_k

    def __repr__(self) -> str:
        kind = ("tma" + ("f" if self.flatten else "") + ("s" if self.subtile else "")) if self.tma else "ptr"
        sk = f"k{self.split_k}" if self.split_k > 1 else ""
        return f"{kind}_{self.bm}x{self.bn}x{self.bk}_s{self.stages}w{self.warps}g{self.group_m}{sk}"


# Candidate tilings, tried by the autotuner (the first is the default when it cannot tune).
CONFIGS_LARGE = [
    Config(128, 256, 128, 3, 8, subtile=True),
    Config(128, 256, 128, 3, 8, subtile=True, flatten=True),
    Config(128, 256, 128, 4, 8, subtile=True),
    Config(256, 128, 128, 3, 8, subtile=True),
    Config(128, 128, 128, 4, 8),
]
CONFIGS_GENERIC = [  # any shape (masked pointer kernel)
    Config(128, 128, 64, 4, 8, tma=False),
    Config(64, 64, 64, 4, 4, tma=False),
]


def small_configs(m: int) -> list[Config]:
    """M <= 64 (decode): memory-bound on the weight; thin tiles and split K fill the SMs."""
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    return [
        Config(bm, 64, 256, 4, 4, group_m=1, tma=False, split_k=4),
        Config(bm, 64, 256, 4, 4, group_m=1, tma=False),
        Config(bm, 64, 256, 4, 4, group_m=1, tma=False, split_k=2),
        Config(bm, 128, 256, 3, 4, group_m=1, tma=False, split_k=4),
        Config(bm, 32, 512, 3, 4, group_m=1, tma=False, split_k=2),
        Config(64, 64, 256, 4, 4, group_m=1),
        Config(bm, 32, 256, 4, 4, group_m=1, tma=False, split_k=4),  # N = 1024 (k / v): 128 programs
        Config(bm, 64, 128, 4, 4, group_m=1, tma=False, split_k=8),
    ]
