from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
from typing_extensions import Buffer

_Buf: TypeAlias = Buffer | np.ndarray[Any, Any]

def build_index(old: _Buf, sa: _Buf, offset: int = 0, length: int = -1, /) -> bytes: ...
def find_covers(old: _Buf, new: _Buf, parts: Sequence[tuple[_Buf, _Buf]], start: int, end: int,
                /) -> bytes: ...
def split_chunk(old: _Buf, chunk: _Buf, old_pos: _Buf, new_pos: _Buf, length: _Buf,
                /) -> tuple[bytes, bytes]: ...
def diff_runs(diff: _Buf, min_zero_run: int, /) -> tuple[int, bytes, bytes, bytes]: ...
