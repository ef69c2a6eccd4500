"""The dataset an audit reads: whatever training accepts, as a memory-mapped ``datasets.Dataset``.

* a directory with ``metadata.jsonl`` (an imagefolder, as ``train_data_dir``): ``load_dataset("imagefolder")``;
* a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``load_from_disk``;
* parquet shards (a ``.parquet`` file or a directory of them): ``load_dataset("parquet")``;
* webdataset shards (a ``.tar`` file or a directory of them): ``load_dataset("webdataset")``.

The image column is read undecoded, so rows are opened one at a time from their bytes or path;
:meth:`AuditSource.rows` reads a contiguous row range, so memory depends on the range, not on N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from memreg.duplicates import first_caption
from memreg.errors import MemregError
from memreg.image_io import ImageDecodeError, load_rgb
from memreg.imagefolder import MetadataError, check_imagefolder, metadata_files


class AuditInputError(MemregError, ValueError):
    """Unusable audit input (dataset, column, model); one line naming it. The CLI exits with 2."""


@dataclass
class Row:
    index: int          # row number in the dataset
    image: Any          # a path, raw bytes, or a PIL image
    caption: str
    name: str           # the image's file name / path, or "<row N>"


def _files(path: Path, suffix: str) -> list[str]:
    if path.is_file():
        return [str(path)] if path.suffix == suffix else []
    return sorted(str(p) for p in path.rglob(f"*{suffix}"))


def _load(path: Path, split: str):
    import datasets

    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    if path.is_dir() and metadata_files(path):
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    for suffix, builder in ((".parquet", "parquet"), (".tar", "webdataset")):
        files = _files(path, suffix)
        if files:
            return datasets.load_dataset(builder, data_files={split: files}, split=split)
    raise AuditInputError(f"--data {str(path)!r}: not an imagefolder with metadata.jsonl, a saved `datasets` "
                          "dataset, or parquet/webdataset shards")


class AuditSource:
    """Rows (image, caption) of a dataset on disk, read in contiguous ranges."""

    def __init__(self, data: str, image_column: str = "image", caption_column: str = "text", split: str = "train",
                 allow_external_files: bool = False):
        import datasets

        path = Path(data)
        if not path.exists():
            raise AuditInputError(f"--data {data!r} does not exist")
        if path.is_dir() and metadata_files(path):
            try:
                check_imagefolder(path, allow_external_files, allow_flag="--allow-external-files")
            except MetadataError as e:
                raise AuditInputError(str(e)) from None
        try:
            ds = _load(path, split)
        except (ValueError, TypeError, OSError, KeyError, IndexError,
                datasets.exceptions.DatasetGenerationError) as e:  # what datasets raises for bad files
            if isinstance(e, AuditInputError):
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AuditInputError(f"--data {data!r}: cannot load ({first})") from None
        cols = list(ds.column_names)
        if image_column not in cols:
            raise AuditInputError(f"--data {data!r}: no image column {image_column!r} (columns: {cols}); "
                                  "pass --image-column")
        if caption_column not in cols:
            raise AuditInputError(f"--data {data!r}: no caption column {caption_column!r} (columns: {cols}); "
                                  "pass --caption-column")
        if len(ds) == 0:
            raise AuditInputError(f"--data {data!r}: the dataset is empty")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.data = ds, data
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self, start: int, stop: int) -> Iterator[Row]:
        """Rows ``start..stop-1`` (one Arrow slice, so memory is bounded by the range)."""
        batch = self.ds[start:stop]
        for k, (img, cap) in enumerate(zip(batch[self.image_column], batch[self.caption_column])):
            ref, name = image_ref(img, start + k)
            yield Row(start + k, ref, first_caption(cap), name)

    def row(self, index: int) -> Row:
        return next(self.rows(index, index + 1))


def image_ref(value: Any, index: int) -> tuple[Any, str]:
    """(path | bytes | PIL image, display name) of an undecoded image cell."""
    if isinstance(value, dict):
        path = value.get("path")
        if path and os.path.exists(path):
            return path, path
        return value.get("bytes"), path or f"<row {index}>"
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), f"<row {index}>"
    return value, str(value) if isinstance(value, str) else f"<row {index}>"


def open_rgb(ref: Any) -> Image.Image:
    """Decode an image reference to RGB by :func:`memreg.image_io.load_rgb` (raises on unreadable data)."""
    if ref is None:
        raise ImageDecodeError("no image data")
    return load_rgb(ref)

