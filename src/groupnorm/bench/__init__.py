"""Time groupnorm against each framework's own GroupNorm, and measure its accuracy against float64.

For one configuration (shape, layout, dtype, groups, activation) every installed implementation runs
its forward pass and its forward and backward pass: groupnorm's front-end and the framework's own
layer, interleaved round by round in one process after a warm-up, next to the time to copy the same
tensor (the floor). The table gives the medians, the achieved GB/s and the ratio groupnorm / peer.
A framework or front-end that is not installed is reported as missing.

With --accuracy it reports each implementation's maximum error against a float64 reference on data
whose group mean is 0, 1e2 and 1e4 times its spread (float32), and on float16 data up to 6e4, with the
number of NaN and Inf outputs. --json writes the results for machines, --plot a PNG chart.
"""

from groupnorm.bench._command import add_arguments, run

__all__ = ["add_arguments", "run"]
