"""jxent: information-theoretic quantities and cross-entropy losses for JAX."""

from jxent import grads, sharded
from jxent._checks import checked, value_checks
from jxent._contrastive import ntxent
from jxent._ctc import ctc_loss
from jxent._fused import linear_cross_entropy
from jxent._information import (
    binary_entropy,
    cross_entropy,
    cross_entropy_from_logits,
    entropy,
    entropy_from_logits,
    generalized_kl_divergence,
    js_divergence,
    js_divergence_from_logits,
    kl_divergence,
    kl_divergence_from_logits,
    log_probs,
    self_information,
    tv_distance,
    tv_distance_from_logits,
)
from jxent._likelihood import gaussian_nll_loss, poisson_nll_loss
from jxent._lmhead import (
    TokenStats,
    linear_distillation_loss,
    linear_entropy,
    linear_js_divergence,
    linear_kl_divergence,
    linear_log_prob_loss,
    linear_log_probs,
    linear_token_stats,
    linear_topk_kl_divergence,
    linear_tv_distance,
)
from jxent._policy import linear_policy_loss, policy_loss
from jxent._preference import (
    kto_loss,
    linear_kto_loss,
    linear_preference_loss,
    preference_loss,
)
from jxent._probability import (
    binary_cross_entropy,
    categorical_cross_entropy,
    mean_squared_error,
)
from jxent._sigmoid import sigmoid_binary_cross_entropy, sigmoid_focal_loss
from jxent._softmax import (
    poly_loss_cross_entropy,
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)

__version__ = "0.1.0"

__all__ = [
    "grads",
    "sharded",
    "binary_cross_entropy",
    "categorical_cross_entropy",
    "checked",
    "ctc_loss",
    "ntxent",
    "mean_squared_error",
    "gaussian_nll_loss",
    "poisson_nll_loss",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "poly_loss_cross_entropy",
    "binary_entropy",
    "cross_entropy",
    "cross_entropy_from_logits",
    "entropy",
    "entropy_from_logits",
    "generalized_kl_divergence",
    "js_divergence",
    "js_divergence_from_logits",
    "kl_divergence",
    "kl_divergence_from_logits",
    "log_probs",
    "policy_loss",
    "preference_loss",
    "kto_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_entropy",
    "linear_js_divergence",
    "linear_kl_divergence",
    "linear_log_prob_loss",
    "linear_log_probs",
    "linear_policy_loss",
    "linear_preference_loss",
    "linear_kto_loss",
    "linear_token_stats",
    "linear_topk_kl_divergence",
    "linear_tv_distance",
    "TokenStats",
    "self_information",
    "tv_distance",
    "tv_distance_from_logits",
    "value_checks",
]
