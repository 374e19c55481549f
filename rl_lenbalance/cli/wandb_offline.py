"""Read wandb offline runs (``offline-run-*`` folders) without the wandb service.

wandb-core (the Go writer behind wandb 0.31) stores a run as ``run-<id>.wandb``:

* a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version ``0``;
* then a LevelDB-style log of 32 KiB blocks. The file header sits at the start of
  the first block, so block boundaries are at multiples of 32 KiB from byte 0.
  Each chunk has a 7-byte header: checksum (uint32 LE), length (uint16 LE) and type
  (FULL=1, FIRST=2, MIDDLE=3, LAST=4). A block tail too short for a chunk header
  is zero padding;
* the checksum is zlib's plain CRC-32 (IEEE) over the type byte and the payload,
  not LevelDB's masked CRC-32C, so it can be verified with the standard library;
* each reassembled record is a serialized ``wandb_internal_pb2.Record``.

Tables logged with ``wandb.Table`` are plain JSON under ``files/media/table/``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """Contents of one offline run folder."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    metric_definitions: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(_step, value)`` for every history row where ``key`` holds a number."""
        return [
            (row["_step"], float(row[key]))
            for row in self.history
            if isinstance(row.get(key), (int, float))
        ]


def find_runs(root: str | Path) -> list[Path]:
    """All ``offline-run-*`` folders below ``root``, oldest modification time first."""
    runs = [path for path in Path(root).rglob("offline-run-*") if path.is_dir()]
    return sorted(runs, key=lambda path: (path.stat().st_mtime, path.name))


def iter_records(wandb_file: str | Path, *, verify_crc: bool = True) -> Iterator[pb.Record]:
    """Yield the ``Record`` protobufs of a ``.wandb`` file in write order.

    A truncated final chunk (a run still being written) ends the iteration quietly;
    a checksum mismatch raises ``ValueError`` unless ``verify_crc`` is false.
    """
    data = Path(wandb_file).read_bytes()
    if not data.startswith(FILE_HEADER):
        raise ValueError(f"{wandb_file}: not a wandb-core .wandb file (header {data[:7]!r})")
    pos = len(FILE_HEADER)
    parts: list[bytes] = []
    while pos + _CHUNK_HEADER.size <= len(data):
        block_left = BLOCK_SIZE - pos % BLOCK_SIZE
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if block_left < _CHUNK_HEADER.size or (crc, length, kind) == (0, 0, 0):
            pos += block_left  # zero padding up to the next block
            continue
        start = pos + _CHUNK_HEADER.size
        pos = start + length
        if pos > len(data):
            return
        # data[start - 1] is the chunk type byte, which the checksum covers too.
        if verify_crc and zlib.crc32(data[start - 1 : pos]) != crc:
            raise ValueError(f"{wandb_file}: checksum mismatch in chunk at byte {start - _CHUNK_HEADER.size}")
        if kind in (_FULL, _FIRST):
            parts = [data[start:pos]]
        elif kind in (_MIDDLE, _LAST) and parts:
            parts.append(data[start:pos])
        else:
            continue  # unknown chunk type, or a continuation without its first chunk
        if kind in (_FULL, _LAST):
            yield pb.Record.FromString(b"".join(parts))
            parts = []


def read_run(run_dir: str | Path, *, verify_crc: bool = True) -> OfflineRun:
    """Parse an offline run folder: history, summary, config, tables and metric definitions.

    Keys are kept as logged: ``"lenbalance/pad_frac"`` stays one key, while a logged
    dict such as ``{"eval": {"acc": 1}}`` comes back as a nested dict. wandb's
    internal ``_wandb`` entry is dropped from config and summary.
    """
    run_dir = Path(run_dir)
    wandb_file = next(iter(sorted(run_dir.glob("*.wandb"))), None)
    if wandb_file is None:
        raise FileNotFoundError(f"no .wandb file in run folder {run_dir}")
    run = OfflineRun(path=run_dir)
    for record in iter_records(wandb_file, verify_crc=verify_crc):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            _update(row, record.history.item)
            row.setdefault("_step", record.history.step.num)
            run.history.append(row)
        elif kind == "summary":
            _update(run.summary, record.summary.update, record.summary.remove)
        elif kind == "config":
            _update(run.config, record.config.update, record.config.remove)
        elif kind == "run":
            _update(run.config, record.run.config.update, record.run.config.remove)
        elif kind == "metric":
            run.metric_definitions.append(MessageToDict(record.metric, preserving_proto_field_name=True))
    run.config.pop("_wandb", None)
    run.summary.pop("_wandb", None)
    run.tables = _read_tables(run_dir / "files", run.history)
    return run


def _update(target: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any] = ()) -> None:
    """Apply wandb ``*Item`` updates/removals; an item's key is ``key`` or its ``nested_key`` path."""
    for item in updates:
        *parents, leaf = list(item.nested_key) or [item.key]
        node = target
        for name in parents:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[leaf] = json.loads(item.value_json)
    for item in removes:
        *parents, leaf = list(item.nested_key) or [item.key]
        node = target
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)


def _read_tables(files_dir: Path, history: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows of every ``*.table.json`` file, keyed by the history key that logged it.

    If a key was logged several times the latest table wins. Files no history row
    points at are keyed by their path below ``media/table`` without ``.table.json``.
    """
    table_dir = files_dir / "media" / "table"
    keys = {
        value["path"]: key
        for row in history
        for key, value in row.items()
        if isinstance(value, dict) and str(value.get("path", "")).endswith(".table.json")
    }
    for path in sorted(table_dir.rglob("*.table.json")):
        name = path.relative_to(table_dir).as_posix().removesuffix(".table.json")
        keys.setdefault(path.relative_to(files_dir).as_posix(), name)
    tables: dict[str, list[dict[str, Any]]] = {}
    for rel_path, key in keys.items():
        if (files_dir / rel_path).is_file():
            table = json.loads((files_dir / rel_path).read_text())
            tables[key] = [dict(zip(table["columns"], row)) for row in table["data"]]
    return tables
