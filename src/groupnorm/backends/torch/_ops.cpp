// groupnorm's operators in C++: the kernels of torch.ops.groupnorm that run on every call, so that a call
// costs what the dispatcher costs. Built on first use by _build.py, together with _cpu_kernel.c; where it
// cannot be built, _ops.py registers Python kernels of the same operators instead.
//
// - group_norm (CompositeImplicitAutograd): the arguments of the common case are checked here; any other
//   case (an error to raise, a torch.func transform, forward-mode AD, FakeTensor, an empty input) is
//   handed to groupnorm::_group_norm_python, where the plan (_plan.py) validates it.
// - forward (CPU): the compiled kernel for float32 in a (kept, reduced, channels, reduced) memory order;
//   other inputs go to groupnorm::_forward_python (the composite).
// - backward (CPU): likewise.
// - forward (Autograd): gradients through backward; with create_graph, through
//   groupnorm::_composite_grad, whose torch operations autograd can differentiate again.

#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

extern "C" {
int groupnorm_forward_f32(const float *x, float *y, int64_t K, int64_t A, int64_t C, int64_t B, int64_t G,
                          const float *gamma, const float *beta, double eps, int shifted, float *shift_out,
                          float *mean_out, float *rstd_out, int nthreads);
int groupnorm_backward_f32(const float *x, const float *dy, float *dx, int64_t K, int64_t A, int64_t C, int64_t B,
                           int64_t G, const float *gamma, const float *shift_in, const float *mean_in,
                           const float *rstd_in, float *dgamma, float *dbeta, int nthreads);
void groupnorm_prefer_huge_pages(void *buffer, int64_t bytes);
typedef void (*groupnorm_body)(void *ctx, int64_t begin, int64_t end);
void groupnorm_set_parallel(void (*fn)(int64_t n, groupnorm_body body, void *ctx));
}

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using OptStr = std::optional<c10::string_view>;
using Five = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Three = std::tuple<Tensor, Tensor, Tensor>;

// below this many elements one thread does the work: starting a parallel region costs more
constexpr int64_t kParallelElements = 1 << 16;

bool huge_pages_enabled() {
    static const bool enabled = [] {
        const char *v = std::getenv("GROUPNORM_HUGE_PAGES");
        return !(v && std::string_view(v) == "0");
    }();
    return enabled;
}

int threads_for(int64_t numel) { return numel < kParallelElements ? 1 : at::get_num_threads(); }

// ---- the operators this file calls -------------------------------------------------------------------

c10::OperatorHandle op(const char *name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

Tensor group_norm_python(const Tensor &input, int64_t groups, const OptTensor &weight, const OptTensor &bias,
                         double eps, int64_t channels_axis, at::OptionalIntArrayRef axes, OptStr activation,
                         bool mean_close_to_zero) {
    static auto handle =
        op("groupnorm::_group_norm_python")
            .typed<Tensor(const Tensor &, int64_t, const OptTensor &, const OptTensor &, double, int64_t,
                          at::OptionalIntArrayRef, OptStr, bool)>();
    return handle.call(input, groups, weight, bias, eps, channels_axis, axes, activation, mean_close_to_zero);
}

using ForwardSig = Five(const Tensor &, const OptTensor &, const OptTensor &, int64_t, int64_t, at::IntArrayRef,
                        double, bool, OptStr, bool);
using BackwardSig = Three(const Tensor &, const Tensor &, const OptTensor &, const OptTensor &, const Tensor &,
                          const Tensor &, const Tensor &, const Tensor &, int64_t, int64_t, at::IntArrayRef, double,
                          bool, OptStr, std::array<bool, 3>);
using CompositeGradSig = Three(const Tensor &, const Tensor &, const OptTensor &, const OptTensor &, int64_t, int64_t,
                               at::IntArrayRef, double, bool, OptStr, std::array<bool, 3>);

// ---- group_norm: the common case's checks -----------------------------------------------------------

bool plain(const Tensor &t) {
    // no torch.func wrapper, no Python subclass or mode (FakeTensor), no forward-mode tangent
    static const c10::DispatchKeySet special({c10::DispatchKey::Python, c10::DispatchKey::FuncTorchBatched,
                                              c10::DispatchKey::FuncTorchGradWrapper,
                                              c10::DispatchKey::FuncTorchDynamicLayerFrontMode,
                                              c10::DispatchKey::PythonTLSSnapshot});
    if (t.key_set().has_any(special) || t.is_meta()) return false;
    return !t._fw_grad(/*level=*/0).defined();
}

bool floating(at::ScalarType s) {
    return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

bool param_ok(const OptTensor &p, const Tensor &x, int64_t channels) {
    if (!p.has_value() || !p->defined()) return true;
    const Tensor &t = *p;
    if (!plain(t) || t.dim() != 1 || t.size(0) != channels || t.device() != x.device()) return false;
    const auto xs = x.scalar_type(), ps = t.scalar_type();
    return ps == xs || (ps == at::kFloat && (xs == at::kHalf || xs == at::kBFloat16));
}

bool activation_ok(OptStr a) { return !a || *a == "relu" || *a == "silu" || *a == "gelu"; }

bool requires_grad(const Tensor &x, const OptTensor &w, const OptTensor &b) {
    if (!c10::GradMode::is_enabled()) return false;
    auto rg = [](const OptTensor &t) { return t.has_value() && t->defined() && t->requires_grad(); };
    return x.requires_grad() || rg(w) || rg(b);
}

Tensor group_norm(const Tensor &input, int64_t groups, const OptTensor &weight, const OptTensor &bias, double eps,
                  int64_t channels_axis, at::OptionalIntArrayRef reduction_axes, OptStr activation,
                  bool mean_close_to_zero) {
    const int64_t ndim = input.dim();
    bool ok = plain(input) && floating(input.scalar_type()) && input.numel() > 0 && ndim >= 2 &&
              channels_axis >= -ndim && channels_axis < ndim && groups > 0 && std::isfinite(eps) && eps >= 0 &&
              activation_ok(activation);
    int64_t c = 0;
    std::vector<int64_t> axes;
    if (ok) {
        c = channels_axis < 0 ? channels_axis + ndim : channels_axis;
        const int64_t channels = input.size(c);
        ok = channels % groups == 0 && param_ok(weight, input, channels) && param_ok(bias, input, channels);
        if (reduction_axes.has_value()) {
            std::vector<bool> seen(ndim, false);
            for (int64_t a : *reduction_axes) {
                if (a < -ndim || a >= ndim) return group_norm_python(input, groups, weight, bias, eps, channels_axis,
                                                                    reduction_axes, activation, mean_close_to_zero);
                a = a < 0 ? a + ndim : a;
                if (a == c || seen[a]) ok = false;
                seen[a] = true;
            }
            for (int64_t a = 0; a < ndim; a++)
                if (seen[a]) axes.push_back(a);
        } else {
            for (int64_t a = c + 1; a < ndim; a++) axes.push_back(a);
            // torch's check: statistics over one value (the Python path raises its ValueError)
            if (c == 1 && input.numel() == groups) ok = false;
        }
    }
    if (!ok)
        return group_norm_python(input, groups, weight, bias, eps, channels_axis, reduction_axes, activation,
                                 mean_close_to_zero);
    static auto forward = op("groupnorm::forward").typed<ForwardSig>();
    const bool keep_pre = activation.has_value() && requires_grad(input, weight, bias);
    return std::get<0>(forward.call(input, weight, bias, groups, c, axes, eps, mean_close_to_zero, activation, keep_pre));
}

// ---- the CPU kernels ---------------------------------------------------------------------------------

struct Geometry {
    int64_t K = 1, A = 1, C = 1, B = 1;
};

// x's (K, A, C, B) where its memory order is [kept] [reduced] channels [reduced] (axes of size 1 left out).
std::optional<Geometry> geometry(const Tensor &x, int64_t c, at::IntArrayRef axes) {
    const int64_t ndim = x.dim();
    std::vector<int64_t> order(ndim);
    std::iota(order.begin(), order.end(), 0);
    const auto sizes = x.sizes(), strides = x.strides();
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return strides[a] > strides[b]; });
    int64_t expected = 1;
    for (auto it = order.rbegin(); it != order.rend(); ++it) {
        if (sizes[*it] == 1) continue;
        if (strides[*it] != expected) return std::nullopt;
        expected *= sizes[*it];
    }
    std::vector<bool> reduced(ndim, false);
    for (int64_t a : axes) reduced[a] = true;
    std::vector<std::pair<char, int64_t>> runs;
    for (int64_t a : order) {
        if (sizes[a] == 1 && a != c) continue;
        const char cls = a == c ? 'c' : reduced[a] ? 'r' : 'k';
        if (!runs.empty() && runs.back().first == cls)
            runs.back().second *= sizes[a];
        else
            runs.emplace_back(cls, sizes[a]);
    }
    Geometry g;
    size_t i = 0;
    if (i < runs.size() && runs[i].first == 'k') g.K = runs[i++].second;
    if (i < runs.size() && runs[i].first == 'r') g.A = runs[i++].second;
    if (i >= runs.size() || runs[i].first != 'c') return std::nullopt;
    g.C = runs[i++].second;
    if (i < runs.size() && runs[i].first == 'r') g.B = runs[i++].second;
    if (i != runs.size()) return std::nullopt;
    return g;
}

Tensor fresh(const Tensor &like) {
    Tensor t = at::empty_like(like, at::MemoryFormat::Preserve);
    if (huge_pages_enabled()) groupnorm_prefer_huge_pages(t.data_ptr(), t.numel() * 4);
    return t;
}

Tensor float_param(const OptTensor &p) {
    if (!p.has_value() || !p->defined()) return Tensor();
    return p->to(at::kFloat).contiguous();  // (below autograd: nothing is recorded)
}

const float *ptr(const Tensor &t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

void activate(std::string_view a, const Tensor &pre, Tensor &out) {
    if (a == "relu")
        at::clamp_min_out(out, pre, 0);
    else if (a == "silu")
        at::silu_out(out, pre);
    else
        at::gelu_out(out, pre);
}

Five forward_cpu(const Tensor &input, const OptTensor &weight, const OptTensor &bias, int64_t groups,
                 int64_t channels_axis, at::IntArrayRef axes, double eps, bool mean_close_to_zero, OptStr activation,
                 bool keep_pre) {
    const auto fmt = input.suggest_memory_format();
    std::optional<Geometry> geo;
    Tensor x;
    // (an epsilon below the numerics' TINY, 2**-96, needs the rescue of groups whose float32 squares
    // underflow: the composite runs it)
    if (input.scalar_type() == at::kFloat && input.numel() > 0 && !input.is_conj() && !input.is_neg() &&
        eps >= 0x1p-96) {
        x = input.contiguous(fmt);
        geo = geometry(x, channels_axis, axes);
    }
    if (!geo) {
        static auto python = op("groupnorm::_forward_python").typed<ForwardSig>();
        return python.call(input, weight, bias, groups, channels_axis, axes, eps, mean_close_to_zero, activation,
                           keep_pre);
    }
    const Geometry g = *geo;
    Tensor w = float_param(weight), b = float_param(bias);
    Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
    if (huge_pages_enabled()) groupnorm_prefer_huge_pages(out.data_ptr(), out.numel() * 4);
    auto stats_options = x.options();
    Tensor shift = at::empty({g.K, groups}, stats_options), mean = at::empty({g.K, groups}, stats_options),
           rstd = at::empty({g.K, groups}, stats_options);
    const int status = groupnorm_forward_f32(
        x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), g.K, g.A, g.C, g.B, groups, ptr(w), ptr(b), eps,
        mean_close_to_zero ? 0 : 1, shift.mutable_data_ptr<float>(), mean.mutable_data_ptr<float>(),
        rstd.mutable_data_ptr<float>(), threads_for(x.numel()));
    TORCH_CHECK(status == 0, "groupnorm: out of memory for the CPU kernel's statistics");
    Tensor pre = at::empty({0}, x.options());
    if (activation) {
        if (keep_pre) {
            pre = out;
            out = at::empty(x.sizes(), x.options().memory_format(fmt));
            if (huge_pages_enabled()) groupnorm_prefer_huge_pages(out.data_ptr(), out.numel() * 4);
        }
        activate(*activation, pre.numel() ? pre : out, out);
    }
    return {out, pre, shift, mean, rstd};
}

Three backward_cpu(const Tensor &grad_out, const Tensor &input, const OptTensor &weight, const OptTensor &bias,
                   const Tensor &pre_in, const Tensor &shift, const Tensor &mean, const Tensor &rstd, int64_t groups,
                   int64_t channels_axis, at::IntArrayRef axes, double eps, bool mean_close_to_zero, OptStr activation,
                   std::array<bool, 3> mask) {
    const auto fmt = input.suggest_memory_format();
    std::optional<Geometry> geo;
    Tensor x;
    if (input.scalar_type() == at::kFloat && input.numel() > 0) {
        x = input.contiguous(fmt);
        geo = geometry(x, channels_axis, axes);
    }
    if (!geo) {
        static auto python = op("groupnorm::_backward_python").typed<BackwardSig>();
        return python.call(grad_out, input, weight, bias, pre_in, shift, mean, rstd, groups, channels_axis, axes, eps,
                           mean_close_to_zero, activation, mask);
    }
    const Geometry g = *geo;
    Tensor dy = grad_out;
    if (dy.scalar_type() != at::kFloat || dy.strides() != x.strides()) dy = at::empty_like(x).copy_(grad_out);
    const bool has_w = weight.has_value() && weight->defined(), has_b = bias.has_value() && bias->defined();
    if (activation) {
        Tensor pre = pre_in;
        if (pre.numel() == 0) {  // not kept by the forward pass: recomputed from the statistics
            static auto python = op("groupnorm::_forward_python").typed<ForwardSig>();
            pre = std::get<0>(python.call(input, weight, bias, groups, channels_axis, axes, eps, mean_close_to_zero,
                                          std::nullopt, false));
        }
        Tensor d = fresh(x);
        if (*activation == "relu")
            at::threshold_backward_out(d, dy, pre, 0);
        else if (*activation == "silu")
            at::silu_backward_out(d, dy, pre);
        else
            at::gelu_backward_out(d, dy, pre);
        dy = d;
    }
    Tensor w = float_param(weight);
    Tensor dx = mask[0] ? at::empty(x.sizes(), x.options().memory_format(fmt)) : Tensor();
    if (dx.defined() && huge_pages_enabled()) groupnorm_prefer_huge_pages(dx.data_ptr(), dx.numel() * 4);
    Tensor dw = mask[1] && has_w ? at::empty({g.C}, x.options()) : Tensor();
    Tensor db = mask[2] && has_b ? at::empty({g.C}, x.options()) : Tensor();
    Tensor sh = shift.contiguous(), mu = mean.contiguous(), rs = rstd.contiguous();
    const int status = groupnorm_backward_f32(
        x.const_data_ptr<float>(), dy.const_data_ptr<float>(), dx.defined() ? dx.mutable_data_ptr<float>() : nullptr,
        g.K, g.A, g.C, g.B, groups, ptr(w), sh.const_data_ptr<float>(), mu.const_data_ptr<float>(),
        rs.const_data_ptr<float>(), dw.defined() ? dw.mutable_data_ptr<float>() : nullptr,
        db.defined() ? db.mutable_data_ptr<float>() : nullptr, threads_for(x.numel()));
    TORCH_CHECK(status == 0, "groupnorm: out of memory for the CPU kernel's statistics");
    Tensor empty = at::empty({0}, x.options());
    return {dx.defined() ? dx : empty, dw.defined() ? dw.to(weight->scalar_type()) : empty,
            db.defined() ? db.to(bias->scalar_type()) : empty};
}

// ---- autograd ----------------------------------------------------------------------------------------

// The gradient of groupnorm::forward, a node of the autograd graph written as torch's generated ones are
// (saved variables and plain fields): what a custom Function's bookkeeping would add costs more than the
// backward kernel of a small layer. Its three next edges are input, weight and bias (an absent one is an
// empty edge); its one input is the gradient of the output.
struct ForwardBackward final : public torch::autograd::Node {
    torch::autograd::SavedVariable input_, weight_, bias_, pre_, shift_, mean_, rstd_;
    bool has_weight = false, has_bias = false, mean_close_to_zero = false;
    int64_t groups = 0, channels_axis = 0;
    std::vector<int64_t> axes;
    double eps = 0.0;
    std::optional<std::string> activation;

    std::string name() const override { return "GroupNormBackward"; }

    void release_variables() override {
        std::lock_guard<std::mutex> lock(mutex_);
        for (auto *v : {&input_, &weight_, &bias_, &pre_, &shift_, &mean_, &rstd_}) v->reset_data();
    }

    torch::autograd::variable_list apply(torch::autograd::variable_list &&grads) override {
        std::lock_guard<std::mutex> lock(mutex_);
        const Tensor input = input_.unpack();
        OptTensor weight = has_weight ? OptTensor(weight_.unpack()) : std::nullopt;
        OptTensor bias = has_bias ? OptTensor(bias_.unpack()) : std::nullopt;
        OptStr act = activation ? OptStr(*activation) : OptStr();
        std::array<bool, 3> mask = {task_should_compute_output(0), has_weight && task_should_compute_output(1),
                                    has_bias && task_should_compute_output(2)};
        Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(input);
        Tensor dx, dw, db;
        if (c10::GradMode::is_enabled()) {  // create_graph: a gradient autograd can differentiate again
            static auto grad_op = op("groupnorm::_composite_grad").typed<CompositeGradSig>();
            std::tie(dx, dw, db) =
                grad_op.call(dy, input, weight, bias, groups, channels_axis, axes, eps, mean_close_to_zero, act, mask);
        } else {
            static auto backward_op = op("groupnorm::backward").typed<BackwardSig>();
            std::tie(dx, dw, db) =
                backward_op.call(dy, input, weight, bias, pre_.unpack(), shift_.unpack(), mean_.unpack(),
                                 rstd_.unpack(), groups, channels_axis, axes, eps, mean_close_to_zero, act, mask);
        }
        auto pick = [](bool need, const Tensor &t) { return need ? t : Tensor(); };
        return {pick(mask[0], dx), pick(mask[1], dw), pick(mask[2], db)};
    }
};

bool has_tangent(const OptTensor &t) { return t.has_value() && t->defined() && t->_fw_grad(0).defined(); }

Five forward_autograd(const Tensor &input, const OptTensor &weight, const OptTensor &bias, int64_t groups,
                      int64_t channels_axis, at::IntArrayRef axes, double eps, bool mean_close_to_zero,
                      OptStr activation, bool keep_pre) {
    static auto forward_op = op("groupnorm::forward").typed<ForwardSig>();
    const bool record = requires_grad(input, weight, bias);
    TORCH_CHECK(!(record && (has_tangent(input) || has_tangent(weight) || has_tangent(bias))),
                "groupnorm::forward has no forward-mode derivative: forward-mode AD runs through "
                "groupnorm::group_norm, which takes the differentiable composite");
    Five r;
    {
        at::AutoDispatchBelowADInplaceOrView guard;
        r = forward_op.call(input, weight, bias, groups, channels_axis, axes, eps, mean_close_to_zero, activation,
                            keep_pre);
    }
    if (!record) return r;  // no graph to record
    auto &[out, pre, shift, mean, rstd] = r;
    auto node = c10::make_intrusive<ForwardBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
    node->has_weight = weight.has_value() && weight->defined();
    node->has_bias = bias.has_value() && bias->defined();
    node->input_ = torch::autograd::SavedVariable(input, false);
    if (node->has_weight) node->weight_ = torch::autograd::SavedVariable(*weight, false);
    if (node->has_bias) node->bias_ = torch::autograd::SavedVariable(*bias, false);
    node->pre_ = torch::autograd::SavedVariable(pre, false);
    node->shift_ = torch::autograd::SavedVariable(shift, false);
    node->mean_ = torch::autograd::SavedVariable(mean, false);
    node->rstd_ = torch::autograd::SavedVariable(rstd, false);
    node->groups = groups;
    node->channels_axis = channels_axis;
    node->axes = axes.vec();
    node->eps = eps;
    node->mean_close_to_zero = mean_close_to_zero;
    if (activation) node->activation = std::string(*activation);
    torch::autograd::set_history(out, node);
    return r;
}

// the kernel's parallel loops run on torch's thread pool
void torch_parallel(int64_t n, groupnorm_body body, void *ctx) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) { body(ctx, begin, end); });
}

const bool parallel_installed = (groupnorm_set_parallel(torch_parallel), true);

}  // namespace

TORCH_LIBRARY_IMPL(groupnorm, CompositeImplicitAutograd, m) { m.impl("group_norm", group_norm); }
TORCH_LIBRARY_IMPL(groupnorm, CPU, m) {
    m.impl("forward", forward_cpu);
    m.impl("backward", backward_cpu);
}
TORCH_LIBRARY_IMPL(groupnorm, Autograd, m) { m.impl("forward", forward_autograd); }

// what _build.py checks before it loads a cached library
extern "C" int groupnorm_ops_abi(void) { return 1; }
