"""Loading a pickled pandas DataFrame without letting the pickle run code.

A pickle names the callables that rebuild its objects, and a plain `pickle.load` imports and
calls whatever it names (`os.system`, ...). `load_dataframe` uses an unpickler that resolves
only the exact pandas and numpy names needed to rebuild a DataFrame of numbers and strings
(the set that pandas 2.x/3.x and numpy 1.x/2.x write); any other name stops loading before
anything is called. The result must be a DataFrame. Each allowed name only builds arrays,
indexes, blocks or the frame itself.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

MAX_PICKLE_BYTES = 512 * 1024 * 1024

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("builtins", "slice"),
    # numpy arrays and dtypes (numpy 2 moved numpy.core to numpy._core)
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    # pandas frame, block manager, indexes
    ("pandas", "DataFrame"),
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.internals.blocks", "new_block"),
    ("pandas", "Index"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas", "RangeIndex"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.indexes.numeric", "Int64Index"),
    # pandas string columns (pandas 3 default string dtype)
    ("pandas", "StringDtype"),
    ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas.arrays", "StringArray"),
    ("pandas.core.arrays.string_", "StringArray"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
})


class UnsafePickleError(ValueError):
    """The file is not a plain pickled DataFrame; nothing it names was run."""


class _DataFrameUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refusing to load: the pickle asks for {module}.{name}, which is not part of "
                "a plain pandas DataFrame (a pickle can run code; nothing was run)"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing to load: the pickle uses persistent ids")


def load_dataframe(path: str | Path) -> Any:
    """The pandas DataFrame pickled in `path`; UnsafePickleError for anything else."""
    import pandas as pd

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise UnsafePickleError(f"{path.name}: {size} bytes is larger than a statistics table")
    data = path.read_bytes()
    try:
        value = _DataFrameUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path.name}: {exc}") from None
    except Exception as exc:  # malformed pickles raise many kinds of errors
        raise UnsafePickleError(f"{path.name}: not a readable pickle: {exc}") from None
    if type(value) is not pd.DataFrame:
        raise UnsafePickleError(
            f"{path.name}: holds a {type(value).__name__}, not a pandas DataFrame"
        )
    return value
