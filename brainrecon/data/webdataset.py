"""Reading webdataset shards (``.tar`` files of ``<key>.<ext>`` members) and their extracted
folders lazily: members are located once (name, file, byte offset, size) and read on demand, so
a dataset of several gigabytes is opened without loading it.

Used by the MindEye1 and MindEye2 readers (:mod:`brainrecon.data.mindeye`). A webdataset sample
is the set of members that share a key: ``sample000000349.nsdgeneral.npy``,
``sample000000349.jpg``, ... (key = the file name up to its first dot, as ``webdataset`` and
BrainGuard's ``utils/data.py`` split it).
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainrecon.errors import DataError


@dataclass(frozen=True)
class Member:
    """One member's bytes: ``size`` bytes at ``offset`` of ``path`` (a tar, or a plain file at 0)."""

    path: Path
    offset: int
    size: int

    def where(self, name: str) -> str:
        return f"{self.path} (member {name})" if self.path.suffix == ".tar" else str(self.path)


def scan_tar(path: Path, fix: str) -> dict[str, dict[str, Member]]:
    """``key -> {ext: Member}`` of every regular member of a tar shard, without reading data.

    A truncated or damaged shard is a :class:`DataError` naming it and ``fix``.
    """
    try:
        fast = _scan_plain_tar(path)
    except OSError as exc:
        raise DataError(f"{path} could not be read as a tar shard ({_one_line(exc)}); {fix}.") from None
    if fast is not None:
        return fast
    samples: dict[str, dict[str, Member]] = {}
    size = path.stat().st_size
    end = 0
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                end = max(end, info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    raise DataError(f"{path} is truncated: member {info.name} ends at byte "
                                    f"{info.offset_data + info.size} of a {size}-byte file; {fix}.")
                key, ext = _split_name(os.path.basename(info.name))
                if ext:
                    samples.setdefault(key, {})[ext] = Member(path, info.offset_data, info.size)
        # A shard cut exactly between two members still reads as a shorter archive: the end-of-archive
        # marker (two zero blocks after the last member) tells the two apart.
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(2 * tarfile.BLOCKSIZE)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{path} could not be read as a tar shard ({_one_line(exc)}); it is truncated or damaged; "
                        f"{fix}.") from None
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise DataError(f"{path} is truncated: it ends without the end-of-archive marker after byte {end}; {fix}.")
    return samples


def _scan_plain_tar(path: Path) -> dict[str, dict[str, Member]] | None:
    """The common case read fast: a tar of plain ustar/GNU headers (names under 100 bytes, regular
    files), each checked by its checksum, ending in the end-of-archive marker. None for anything
    else (pax or long-name headers, links, damage): :func:`scan_tar` then reads it with
    :mod:`tarfile`, which explains what is wrong. Python's ``tarfile`` spends ~0.1 ms per header;
    a MindEye2 subject's shards have about 100,000 members."""
    samples: dict[str, dict[str, Member]] = {}
    size = path.stat().st_size
    block = tarfile.BLOCKSIZE
    with open(path, "rb") as f:
        pos = 0
        while True:
            f.seek(pos)
            header = f.read(block)
            if len(header) < block:
                return None
            if header == bytes(block):
                return samples if f.read(block) == bytes(block) else None
            try:
                chksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
                length = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                return None
            if chksum != sum(header[:148]) + 256 + sum(header[156:]) or header[156:157] not in (b"0", b"\0"):
                return None
            if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
                return None  # a prefix field: leave long paths to tarfile
            data = pos + block
            if data + length > size:
                return None
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            key, ext = _split_name(os.path.basename(name))
            if ext:
                samples.setdefault(key, {})[ext] = Member(path, data, length)
            pos = data + -(-length // block) * block


def scan_folder(path: Path) -> dict[str, dict[str, Member]]:
    """``key -> {ext: Member}`` of an extracted shard folder (one file per member)."""
    samples: dict[str, dict[str, Member]] = {}
    for entry in os.scandir(path):
        if entry.is_file():
            key, ext = _split_name(entry.name)
            if ext:
                samples.setdefault(key, {})[ext] = Member(Path(entry.path), 0, entry.stat().st_size)
    return samples


def _split_name(name: str) -> tuple[str, str]:
    key, _, ext = name.partition(".")
    return key, ext


class MemberReader:
    """Reads members, keeping one open handle per file (tar shards are read many times)."""

    def __init__(self, fix: str):
        self.fix = fix
        self._handles: dict[Path, Any] = {}

    def read(self, member: Member, name: str) -> bytes:
        try:
            f = self._handles.get(member.path)
            if f is None:
                if len(self._handles) >= 64:  # extracted folders: many small files
                    for old in self._handles.values():
                        old.close()
                    self._handles.clear()
                f = self._handles[member.path] = open(member.path, "rb")
            f.seek(member.offset)
            data = f.read(member.size)
        except OSError as exc:
            raise DataError(f"{member.where(name)} could not be read ({_one_line(exc)}); {self.fix}.") from None
        if len(data) != member.size:
            raise DataError(f"{member.where(name)} is truncated ({len(data)} of {member.size} bytes); {self.fix}.")
        return data

    def npy(self, member: Member, name: str) -> np.ndarray:
        data = self.read(member, name)
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{member.where(name)} is not a readable .npy array ({_one_line(exc)}); {self.fix}.") from None

    def image(self, member: Member, name: str) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        data = self.read(member, name)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{member.where(name)} is not a readable image ({_one_line(exc)}); {self.fix}.") from None

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        return {"fix": self.fix, "_handles": {}}


class LazyImages:
    """uint8 images (n, H, W, 3) decoded on demand from members (JPEG/PNG)."""

    def __init__(self, members: list[tuple[Member, str]], reader: MemberReader):
        self.members = members
        self.reader = reader
        first = reader.image(*members[0])
        self._hw = first.shape[:2]
        self.shape = (len(members),) + first.shape
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def _one(self, i: int) -> np.ndarray:
        member, name = self.members[int(i)]
        img = self.reader.image(member, name)
        if img.shape[:2] != self._hw:
            raise DataError(f"{member.where(name)} is {img.shape[1]}x{img.shape[0]} pixels but the split's other "
                            f"images are {self._hw[1]}x{self._hw[0]}; {self.reader.fix}.")
        return img

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self._one(index)
        rows = np.atleast_1d(np.arange(self.shape[0])[index])
        out = np.empty((len(rows),) + self.shape[1:], dtype=np.uint8)
        for k, i in enumerate(rows):
            out[k] = self._one(i)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[slice(None)]
        return arr if dtype is None else arr.astype(dtype)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
