"""A checkpoint opened for work: detected architecture and layout, reference-layout tensor access.

:func:`open_model` detects the file from its header and gives the concrete :class:`ModelTable`; its
:meth:`Model.get_ref` returns a tensor by *reference* key whatever the file's layout (split rows
re-assembled, swapped halves restored), one tensor at a time, so two checkpoints in different layouts
(an LDM base and a diffusers fine-tune) can be compared module by module.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .arch.base import ModelTable
from .arch.detect import Detection, detect_checkpoint, layout_inverses
from .errors import InputError
from .formats.keys import looks_like_lora
from .io.reader import TensorSource, open_source


@dataclass
class Model:
    """An open checkpoint: its source, detection and reference-layout view."""

    path: Path
    source: TensorSource
    detection: Detection

    @property
    def table(self) -> ModelTable:
        assert self.detection.table is not None
        return self.detection.table

    @property
    def arch(self) -> str:
        assert self.detection.arch is not None
        return self.detection.arch

    @property
    def layout(self) -> str:
        assert self.detection.layout is not None
        return self.detection.layout

    def __post_init__(self) -> None:
        inv = layout_inverses(self.table)[self.layout]
        self._entries: dict[str, list[tuple[str, tuple[int, int] | None]]] = {}
        for fk in self.source.keys():
            hit = inv.get(fk)
            if hit is not None:
                self._entries.setdefault(hit[0], []).append((fk, hit[1]))
        for entries in self._entries.values():
            entries.sort(key=lambda e: e[1][0] if e[1] else 0)
        base = self.table.layouts[self.layout.split(":")[0]]
        self._swapped = base.swapped
        self._transposed = base.transposed

    @property
    def file_bytes(self) -> int:
        """Size on disk of every file of the checkpoint."""
        return sum(f.stat().st_size for f in self.source.files)

    def file_entries(self, ref_key: str) -> list[tuple[str, tuple[int, int] | None]]:
        """File keys (and the rows each holds) that store reference tensor ``ref_key``."""
        return self._entries.get(ref_key, [])

    def has_ref(self, ref_key: str) -> bool:
        return ref_key in self._entries

    def ref_keys(self) -> list[str]:
        """Reference keys present in the file, in the table's order."""
        return [k for k in self.table.tensors if k in self._entries]

    def ref_shape(self, ref_key: str) -> tuple[int, ...]:
        entries = self._entries[ref_key]
        shapes = [tuple(self.source.info(fk).shape) for fk, _ in entries]
        if len(shapes) == 1 and entries[0][1] is None:
            return shapes[0]
        return (sum(s[0] for s in shapes),) + shapes[0][1:]

    def ref_dtype(self, ref_key: str) -> torch.dtype:
        return self.source.info(self._entries[ref_key][0][0]).torch_dtype

    def get_ref(self, ref_key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The reference-layout tensor (file dtype), assembled from its file tensors."""
        entries = self._entries.get(ref_key)
        if not entries:
            raise KeyError(ref_key)
        parts = [self.source.get(fk, device=device) for fk, _ in entries]
        t = parts[0] if len(parts) == 1 and entries[0][1] is None else torch.cat(parts, 0)
        if ref_key in self._transposed:
            t = t.T
        if ref_key in self._swapped:
            h = t.shape[0] // 2
            t = torch.cat([t[h:], t[:h]], 0)
        want = tuple(self.table.tensors.get(ref_key, t.shape))
        if tuple(t.shape) != want and t.numel() == _numel(want):
            t = t.reshape(want)  # e.g. VAE attention: 1x1 conv in LDM, Linear in diffusers
        return t.contiguous()

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def open_model(path: str | Path, *, role: str = "checkpoint") -> Model:
    """Open and detect a checkpoint; a clear error when it is a LoRA or of no known architecture."""
    src = open_source(path)
    try:
        keys = src.keys()
        if looks_like_lora(keys):
            raise InputError(f"is a LoRA, not a {role}: its keys are LoRA tensors "
                             f"(e.g. {keys[0]}). Pass a full model checkpoint.", path)
        det = detect_checkpoint(src.shapes())
        if det.kind != "checkpoint" or det.table is None:
            raise InputError(f"is not a checkpoint of a supported architecture (SD1.x, SD2.x, SDXL, SD3, "
                             f"FLUX.1): {'; '.join(det.evidence)}.", path)
        if det.ambiguous:
            raise InputError(f"matches several architectures equally well ({det.arch} {det.layout}, "
                             f"{', '.join(det.ambiguous)}); it cannot be used without guessing.", path)
        return Model(Path(path), src, det)
    except BaseException:
        src.close()
        raise
