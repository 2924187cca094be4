"""Block-importance estimators (stage 1), one module each, chosen by `SparseAttentionConfig.estimator`.

| name | settings | what it scores | cost (of dense `Q K^T`) |
|---|---|---|---|
| `"query_tiles"` | `QueryTiles(tile_size=16)` | tile-mean queries against every key | `1 / tile_size` |
| `"sampled_rows"` | `SampledRows(rows=8)` | `rows` real query rows per block against every key | `rows / block_size` |
| `"pooled"` | `PooledTiles(tile_size=16, outliers=True)` | tile means, each outlier key apart | `~2 / tile_size^2` |

`base.py` says what an estimator is and holds the registry; see docs/DESIGN.md for the math and the measurements that
chose the default.
"""

from . import pooled, probes  # noqa: F401  (register the built-in estimators)
from .base import (
    Estimator,
    EstimatorConfig,
    EstimatorInputs,
    estimator_for,
    parse_estimator,
    register_estimator,
    registered_estimators,
    unregister_estimator,
)
from .pooled import PooledTiles
from .probes import QueryTiles, SampledRows

__all__ = [
    "Estimator",
    "EstimatorConfig",
    "EstimatorInputs",
    "PooledTiles",
    "QueryTiles",
    "SampledRows",
    "estimator_for",
    "parse_estimator",
    "register_estimator",
    "registered_estimators",
    "unregister_estimator",
]
