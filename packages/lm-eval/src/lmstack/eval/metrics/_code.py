"""pass@k: the unbiased estimator of Chen et al. (2021) for code generation.

With ``n`` samples of which ``c`` pass the tests, the chance that at least one of ``k`` samples drawn
without replacement passes is ``1 - C(n - c, k) / C(n, k)``. It is computed as the product
``prod_{i = n - c + 1}^{n} (1 - k / i)``, which never forms the (huge) binomial coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmstack.eval.metrics._errors import MetricError

__all__ = ["CodeResult", "pass_at_k"]


@dataclass(frozen=True)
class CodeResult:
    """One problem's code samples, run against its tests.

    Attributes:
        num_samples: How many samples were generated (``n``).
        num_correct: How many passed every test (``c``).
    """

    num_samples: int
    num_correct: int

    def __post_init__(self) -> None:
        if not 0 <= self.num_correct <= self.num_samples:
            raise MetricError(
                f"need 0 <= num_correct <= num_samples, got {self.num_correct} of {self.num_samples}"
            )


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k estimate for one problem.

    Args:
        num_samples: ``n``, the samples generated.
        num_correct: ``c``, the samples that passed.
        k: The budget; ``1 <= k <= n``.

    Returns:
        The probability that at least one of ``k`` samples drawn from the ``n`` passes.

    Raises:
        MetricError: ``k`` outside ``[1, n]`` or ``c`` outside ``[0, n]``.
    """
    CodeResult(num_samples, num_correct)  # validates n and c
    if not 1 <= k <= num_samples:
        raise MetricError(f"pass@{k} needs 1 <= k <= the {num_samples} samples generated")
    if num_samples - num_correct < k:
        return 1.0  # every draw of k samples contains a correct one
    failing_all = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        failing_all *= 1.0 - k / i
    return 1.0 - failing_all
