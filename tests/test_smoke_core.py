import numpy as np

import groupnorm
from support import NAMED_CONFIGS


def test_named_configs_match_reference() -> None:
    for name, cfg in NAMED_CONFIGS.items():
        a = cfg.arrays()
        y = groupnorm.group_norm(a["x"], gamma=a["gamma"], beta=a["beta"], **cfg.kwargs())
        np.testing.assert_allclose(y, cfg.reference(a["x"], a["gamma"], a["beta"]), atol=1e-10, err_msg=name)
