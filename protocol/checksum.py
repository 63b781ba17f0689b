"""CRC-32: the IEEE / zlib polynomial the formats use (docs/FORMAT.md), computed by zlib-ng.

Every payload byte is checksummed several times on its way: by the agent, by the server when it arrives
and when it is read back from the write-ahead log, and by the applier over the before-images it keeps.
zlib's CRC-32 runs at ~2 GB/s on this class of machine; zlib-ng folds with carry-less multiplication at
~9 GB/s over the same 512 MiB (both release the GIL). Same function, same values: zlib can check them.
"""

from __future__ import annotations

from zlib_ng.zlib_ng import crc32

__all__ = ["crc32"]
