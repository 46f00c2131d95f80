"""BA-LoRA's output-space regularisers.

* :mod:`~balora.regularizers.formulas` -- the pure formulas on logits (eq. 4-7, 9-12);
* :mod:`~balora.regularizers.tokens` -- the same terms over the valid tokens of a causal LM,
  from hidden states and the output head, in chunks (one mechanism for every token loss) and the
  exact SVD term via the QR factorisation of the head;
* :mod:`~balora.regularizers.common` -- the variant names, constants and argument checks.
"""

from balora.regularizers.formulas import (
    consistency_loss,
    covariance_diversity_loss,
    svd_loss,
    topk_entropy_diversity_loss,
)

__all__ = ["consistency_loss", "covariance_diversity_loss", "svd_loss", "topk_entropy_diversity_loss"]
