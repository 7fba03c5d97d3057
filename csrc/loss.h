// The fused objective J = L + s (loss.cpp): what the autograd node of
// fused_mlp_loss (autograd.cpp) needs of the loss beyond its two ops.
#pragma once

#include <string_view>

#include "mlp.h"

namespace mlp_ext {

// L(o, target) from torch's own differentiable losses (F.cross_entropy or
// F.mse_loss on the rows of o), for second derivatives.
Tensor differentiable_loss(
    const Tensor& o, const Tensor& target, std::string_view loss, std::string_view reduction);

}  // namespace mlp_ext
