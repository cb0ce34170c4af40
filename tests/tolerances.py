"""One table of comparison tolerances per dtype, with the reason.

Kernels compute in fp32 and round once at the end, as the reference does, so fp32 results differ
only by summation order (reductions over up to ~10^4 values: a few 1e-6 relative) and half
precisions by one or two units in the last place of the output dtype.
"""

import torch

# dtype -> (atol, rtol)
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),   # fp16 ulp at 1.0 is 9.8e-4
    torch.bfloat16: (1.6e-2, 1.6e-2),  # bf16 ulp at 1.0 is 7.8e-3
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0,
                 msg: str = "") -> None:
    """assert_close with the table's tolerance for ``dtype`` (default: expected's), times ``scale``."""
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual.float() if actual.dtype != torch.float64 else actual,
                               expected.float() if expected.dtype != torch.float64 else expected,
                               atol=atol * scale, rtol=rtol * scale, msg=lambda m: f"{msg}\n{m}")
