// TLR's step on the CPU in one pass (PyTorch path, one α per group, its scalars read on the
// host). Built on first use by kernels/cpu.py (torch.utils.cpp_extension); where it cannot
// be built, the PyTorch path runs torch's own ops instead (functional._tlr_cpu calls this).
//
// Why: torch's CPU ops cannot fuse TLR's work. With them the default (momentum, weight decay,
// A summing u) cost torch's fused SGD kernel plus two foreach adds per step (44 bytes per
// parameter) and, at a unit's end, four more reductions over A, P and w. Here an ordinary step
// is one pass that reads w, g, b, A and writes w, b, A (28 bytes). A unit's end takes ‖A‖²,
// ‖w‖², ⟨A, w⟩ (and ⟨A, P⟩ where the window is scheduled to close) while each block is still in
// L1. Where the window is not scheduled to close, α can only change after this step's move, so
// the same pass moves too (28 bytes); at a scheduled closing the move waits for the host's
// decision and comes in a second pass (w -= lr·d: 12 bytes), and the first zeroes P after
// reading it (P becomes the next window's A): 44 bytes in all.
//
// Per element, in the parameters' precision, as SPEC and torch.optim.SGD:
//   u = s·g + λ·w (no λ·w term when λ = 0);  b = u on a tensor's first step, else μ·b + (1-τ)·u;
//   d = b, or u + μ·b (nesterov), or u without momentum;  A += u (statistic "gradient", or no
//   momentum) or A += d;  w -= lr·d.
// Sums: vector partial sums within a block of BLOCK elements, each block's total added in
// double, the chunks' totals in a fixed order, so that the result does not depend on the
// number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace {

constexpr int64_t BLOCK = 1024;    // elements whose reductions are taken while they sit in L1
constexpr int64_t CHUNK = 32768;   // a thread's share, torch's own grain size (at::internal::GRAIN_SIZE)

struct Scalars {
  double sign, lam, mu, damp, lr;
  bool nesterov, sum_u, has_momentum;
};

// One block's update, the branches resolved at compile time so that the loop vectorises.
template <typename T, bool DECAY, bool MOMENTUM, bool FIRST, bool NESTEROV, bool SUM_U, bool MOVE>
void update(T* __restrict w, const T* __restrict g, T* __restrict b, T* __restrict a, int64_t n, const Scalars& s) {
  const T sign = s.sign, lam = s.lam, mu = s.mu, keep = 1.0 - s.damp, lr = s.lr;
  for (int64_t i = 0; i < n; ++i) {
    const T wi = w[i];
    const T u = DECAY ? sign * g[i] + lam * wi : sign * g[i];  // λ = 0: no λ·w (0·inf would be NaN)
    T d = u;
    if constexpr (MOMENTUM) {
      const T bi = FIRST ? u : mu * b[i] + keep * u;
      b[i] = bi;
      d = NESTEROV ? u + mu * bi : bi;
    }
    a[i] += SUM_U ? u : d;
    if constexpr (MOVE) w[i] = wi - lr * d;
  }
}

template <typename T>
using Update = void (*)(T*, const T*, T*, T*, int64_t, const Scalars&);

template <typename T, bool DECAY, bool MOMENTUM, bool FIRST, bool NESTEROV>
Update<T> pick(bool sum_u, bool move) {
  if (sum_u) return move ? update<T, DECAY, MOMENTUM, FIRST, NESTEROV, true, true>
                         : update<T, DECAY, MOMENTUM, FIRST, NESTEROV, true, false>;
  return move ? update<T, DECAY, MOMENTUM, FIRST, NESTEROV, false, true>
              : update<T, DECAY, MOMENTUM, FIRST, NESTEROV, false, false>;
}

template <typename T, bool DECAY>
Update<T> pick(const Scalars& s, bool first, bool move) {
  if (!s.has_momentum) return pick<T, DECAY, false, false, false>(true, move);
  if (first)
    return s.nesterov ? pick<T, DECAY, true, true, true>(s.sum_u, move) : pick<T, DECAY, true, true, false>(s.sum_u, move);
  return s.nesterov ? pick<T, DECAY, true, false, true>(s.sum_u, move) : pick<T, DECAY, true, false, false>(s.sum_u, move);
}

template <typename T>
Update<T> pick(const Scalars& s, bool first, bool move) {
  return s.lam != 0.0 ? pick<T, true>(s, first, move) : pick<T, false>(s, first, move);
}

// A block's [⟨A, P⟩, ‖A‖², ‖w‖², ⟨A, w⟩], added to out. GCC/Clang vector types keep the
// partial sums in registers (two vectors per sum for independent chains); a plain array of
// lanes was vectorised too but went through memory at every step (2× slower).
template <typename T, bool WITH_P>
void sums(const T* __restrict a, const T* __restrict p, const T* __restrict w, int64_t n, double* out) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = sizeof(V) / sizeof(T);
  V dot[2] = {}, sq[2] = {}, ww[2] = {}, aw[2] = {};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    for (int h = 0; h < 2; ++h) {
      V av, pv, wv;
      __builtin_memcpy(&av, a + i + h * L, sizeof(V));
      __builtin_memcpy(&wv, w + i + h * L, sizeof(V));
      if constexpr (WITH_P) {
        __builtin_memcpy(&pv, p + i + h * L, sizeof(V));
        dot[h] += av * pv;
      }
      sq[h] += av * av; ww[h] += wv * wv; aw[h] += av * wv;
    }
  }
  double t[4] = {0, 0, 0, 0};
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < L; ++j) {
      t[0] += dot[h][j]; t[1] += sq[h][j]; t[2] += ww[h][j]; t[3] += aw[h][j];
    }
  for (; i < n; ++i) {
    if constexpr (WITH_P) t[0] += a[i] * p[i];
    t[1] += a[i] * a[i]; t[2] += w[i] * w[i]; t[3] += a[i] * w[i];
  }
  for (int k = 0; k < 4; ++k) out[k] += t[k];
}

// The move a unit's end deferred until after its sums: w -= lr·d with d as ``update`` made
// it (b is already this step's buffer; u is recomputed from g and the unmoved w).
template <typename T>
void move_block(T* __restrict w, const T* __restrict g, const T* __restrict b, int64_t n, const Scalars& s) {
  const T lr = s.lr, sign = s.sign, lam = s.lam, mu = s.mu;
  if (s.has_momentum && !s.nesterov) {
    for (int64_t i = 0; i < n; ++i) w[i] -= lr * b[i];
  } else if (s.lam == 0.0) {  // as ``update``: no λ·w
    for (int64_t i = 0; i < n; ++i) w[i] -= lr * (s.has_momentum ? sign * g[i] + mu * b[i] : sign * g[i]);
  } else if (s.has_momentum) {
    for (int64_t i = 0; i < n; ++i) w[i] -= lr * ((sign * g[i] + lam * w[i]) + mu * b[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) w[i] -= lr * (sign * g[i] + lam * w[i]);
  }
}

// The chunks of every tensor, (tensor, first element): all chunks of all tensors go in one
// parallel loop, one fork and join per call however many tensors there are (a join costs a
// scheduler slice when other processes share the cores; torch's ops join once per tensor).
std::vector<std::pair<int64_t, int64_t>> chunks_of(const std::vector<at::Tensor>& w) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (size_t t = 0; t < w.size(); ++t)
    for (int64_t lo = 0; lo < w[t].numel(); lo += CHUNK) chunks.emplace_back(t, lo);
  return chunks;
}

struct Mode {
  bool update, move, reduce, zero_p;
};

template <typename T>
void run(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& g, const std::vector<at::Tensor>& b,
         const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& p, const std::vector<bool>& first,
         const Mode& mode, const Scalars& s, std::vector<double>& totals) {
  const auto chunks = chunks_of(w);
  std::vector<double> part(mode.reduce ? 4 * chunks.size() : 0, 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const auto [t, lo] = chunks[c];
      const int64_t hi = std::min(w[t].numel(), lo + CHUNK);
      T* W = w[t].data_ptr<T>();
      const T* G = g[t].data_ptr<T>();
      T* B = s.has_momentum ? b[t].data_ptr<T>() : nullptr;
      T* A = mode.update ? a[t].data_ptr<T>() : nullptr;
      T* P = mode.reduce && !p.empty() ? p[t].data_ptr<T>() : nullptr;
      // With the sums, the move waits for them: they read the weights before it.
      const Update<T> up = mode.update ? pick<T>(s, first[t], mode.move && !mode.reduce) : nullptr;
      for (int64_t i = lo; i < hi; i += BLOCK) {
        const int64_t n = std::min(BLOCK, hi - i);
        if (up) up(W + i, G + i, B ? B + i : nullptr, A + i, n, s);
        if (mode.reduce && P) sums<T, true>(A + i, P + i, W + i, n, &part[4 * c]);
        if (mode.reduce && !P) sums<T, false>(A + i, nullptr, W + i, n, &part[4 * c]);
        if (mode.zero_p) std::fill(P + i, P + i + n, T(0));
        if (mode.move && (mode.reduce || !up)) move_block<T>(W + i, G + i, B ? B + i : nullptr, n, s);
      }
    }
  });
  for (size_t c = 0; c < chunks.size() && mode.reduce; ++c)
    for (int k = 0; k < 4; ++k) totals[k] += part[4 * c + k];
}

void check(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& other, const char* what) {
  TORCH_CHECK(other.size() == w.size(), what, ": ", other.size(), " tensors for ", w.size(), " parameters");
  for (size_t t = 0; t < w.size(); ++t) {
    TORCH_CHECK(other[t].numel() == w[t].numel() && other[t].is_contiguous() && other[t].device().is_cpu() &&
                    other[t].scalar_type() == w[t].scalar_type() && other[t].layout() == at::kStrided,
                what, "[", t, "] is not a contiguous CPU tensor of its parameter's size and dtype");
  }
}

std::vector<double> dispatch(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& g,
                             const std::vector<at::Tensor>& b, const std::vector<at::Tensor>& a,
                             const std::vector<at::Tensor>& p, const std::vector<bool>& first, const Mode& mode,
                             const Scalars& s) {
  check(w, w, "params");
  check(w, g, "grads");
  if (s.has_momentum) check(w, b, "momentum buffers");
  if (mode.update) check(w, a, "window sums");
  if (mode.zero_p || (mode.reduce && !p.empty())) check(w, p, "previous window sums");
  TORCH_CHECK(!mode.update || first.size() == w.size(), "first: one flag per tensor");
  TORCH_CHECK(w.empty() || w[0].scalar_type() == at::kFloat || w[0].scalar_type() == at::kDouble,
              "float32 or float64 tensors, got ", w.empty() ? at::kFloat : w[0].scalar_type());
  // Written through raw pointers: tell autograd, as torch's in-place ops do (a tensor saved
  // for a backward pass and changed since then must raise, not give a wrong gradient).
  for (size_t t = 0; t < w.size(); ++t) {
    if (mode.move) torch::autograd::impl::bump_version(w[t]);
    if (mode.update && s.has_momentum) torch::autograd::impl::bump_version(b[t]);
    if (mode.update) torch::autograd::impl::bump_version(a[t]);
    if (mode.zero_p) torch::autograd::impl::bump_version(p[t]);
  }
  std::vector<double> totals(mode.reduce ? 4 : 0, 0.0);
  if (w.empty()) return totals;
  if (w[0].scalar_type() == at::kFloat) {
    run<float>(w, g, b, a, p, first, mode, s, totals);
  } else {
    run<double>(w, g, b, a, p, first, mode, s, totals);
  }
  return totals;
}

}  // namespace

// One step for a list of same-dtype (float32 or float64) contiguous CPU tensors: u, the
// momentum buffers (b: empty without momentum; ``first``: tensors whose b is written as u),
// A, and with ``move`` the weights (w -= lr·d). With ``reduce`` (a unit's end) it returns the
// group's [⟨A, P⟩, ‖A‖², ‖w‖², ⟨A, w⟩], A after this step's term and w before the move (else
// []; ⟨A, P⟩ is 0 where ``p`` is empty: a unit's end that does not close reads P only if
// the guard trips); with ``zero_p`` it zeroes P after reading it (a closing: P becomes the next A).
std::vector<double> step(std::vector<at::Tensor> w, std::vector<at::Tensor> g, std::vector<at::Tensor> b,
                         std::vector<at::Tensor> a, std::vector<at::Tensor> p, std::vector<bool> first, double lr,
                         bool move, bool reduce, bool zero_p, double sign, double lam, double mu, double damp,
                         bool nesterov, bool sum_u) {
  TORCH_CHECK(!zero_p || reduce, "P is zeroed only after its sums");
  const bool has_momentum = mu != 0.0;
  const Scalars s{sign, lam, mu, damp, lr, nesterov, sum_u || !has_momentum, has_momentum};
  return dispatch(w, g, b, a, p, first, Mode{true, move, reduce, zero_p}, s);
}

// The move that a unit's end deferred until α was decided: w -= lr·d, d as ``step`` made it.
void move(std::vector<at::Tensor> w, std::vector<at::Tensor> g, std::vector<at::Tensor> b, double lr, double sign,
          double lam, double mu, bool nesterov) {
  const Scalars s{sign, lam, mu, 0.0, lr, nesterov, true, mu != 0.0};
  dispatch(w, g, b, {}, {}, {}, Mode{false, true, false, false}, s);
}

// The number of threads that at::parallel_for ran ``tasks`` one-element tasks on. ATen's
// parallel_for is a ``#pragma omp parallel`` in its header, so in a module built without
// OpenMP it runs on one thread whatever torch's thread count: the tests check the build here.
int64_t parallel_threads(int64_t tasks) {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    const int64_t mine = at::get_thread_num() + 1;
    int64_t seen = most.load();
    while (mine > seen && !most.compare_exchange_weak(seen, mine)) {
    }
  });
  return most.load();
}

// ---- Host side of the Triton path (kernels/cpu.py: layout_record, same_layout) ----
// What the Triton path's host work depends on, per parameter: its identity, address, size,
// dtype, device and contiguity, and its gradient's address, size, dtype, device and contiguity
// (address 0: no gradient). Read from Python that is a dozen attribute reads per tensor, each a
// map over the group (~100 µs for GPT-2 small's 148 tensors); here one pass. A row per
// parameter of LAYOUT_FIELDS int64s; the addresses in columns WEIGHT_ADDRESS and GRAD_ADDRESS.
constexpr int64_t LAYOUT_FIELDS = 7;
constexpr int64_t WEIGHT_ADDRESS = 1;
constexpr int64_t GRAD_ADDRESS = 4;

static int64_t layout_code(const at::Tensor& t) {
  const at::Device device = t.device();
  return static_cast<int64_t>(t.scalar_type()) | (static_cast<int64_t>(device.type()) << 8) |
         (static_cast<int64_t>(device.index() + 1) << 16) | (static_cast<int64_t>(t.is_contiguous()) << 32);
}

// A dense tensor whose memory the kernels can address: not sparse, not a tensor subclass that
// dispatches to Python (a DTensor: its storage is not its data), with storage.
static bool plain(const at::Tensor& t) {
  return t.layout() == at::kStrided && t.has_storage() && !t.unsafeGetTensorImpl()->is_python_dispatch();
}

// ``row`` for ``p``; false where p or its gradient is not plain: such a group has no record.
static bool layout_row(const at::Tensor& p, int64_t* row) {
  if (!p.defined() || !plain(p)) return false;
  const at::Tensor& g = p.grad();
  row[0] = reinterpret_cast<int64_t>(p.unsafeGetTensorImpl());
  row[WEIGHT_ADDRESS] = reinterpret_cast<int64_t>(p.const_data_ptr());
  row[2] = p.numel();
  row[3] = layout_code(p);
  if (!g.defined()) {
    row[GRAD_ADDRESS] = row[5] = row[6] = 0;
    return true;
  }
  if (!plain(g)) return false;
  row[GRAD_ADDRESS] = reinterpret_cast<int64_t>(g.const_data_ptr());
  row[5] = g.numel();
  row[6] = layout_code(g);
  return true;
}

// With ``write``: fills ``record`` (int64 [n, LAYOUT_FIELDS], contiguous, on the CPU) for
// ``params``; returns 0, or 2 where a row cannot be made. Without: compares ``params`` with
// ``record``, which it does not change: 0 where every row is the same; 1 where only addresses
// differ (a weight's or a gradient's, each still 16-byte aligned or still not, everything else
// the same), the addresses now then written to ``moved`` (int64 [n, 2]); else 2.
int64_t layout(const std::vector<at::Tensor>& params, at::Tensor record, bool write, at::Tensor moved) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(record.scalar_type() == at::kLong && record.is_contiguous() && record.device().is_cpu() &&
                  record.dim() == 2 && record.size(1) == LAYOUT_FIELDS,
              "a layout record is a contiguous int64 CPU tensor [n, ", LAYOUT_FIELDS, "]");
  TORCH_CHECK(write || (moved.scalar_type() == at::kLong && moved.is_contiguous() && moved.device().is_cpu() &&
                        moved.numel() == 2 * record.size(0)),
              "moved addresses go to a contiguous int64 CPU tensor of 2 per record row");
  if (record.size(0) != n) return 2;
  int64_t* rows = record.data_ptr<int64_t>();
  int64_t row[LAYOUT_FIELDS];
  bool any_moved = false;
  for (int64_t i = 0; i < n; ++i, rows += LAYOUT_FIELDS) {
    if (!layout_row(params[i], row)) return 2;
    if (write) {
      std::copy(row, row + LAYOUT_FIELDS, rows);
      continue;
    }
    for (int64_t k = 0; k < LAYOUT_FIELDS; ++k) {
      if (row[k] == rows[k]) continue;
      if (k != WEIGHT_ADDRESS && k != GRAD_ADDRESS) return 2;
      if ((row[k] % 16 == 0) != (rows[k] % 16 == 0)) return 2;  // the kernels' ALIGN would change
      any_moved = true;
    }
  }
  if (write || !any_moved) return 0;
  int64_t* out = moved.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i, out += 2) {
    layout_row(params[i], row);
    out[0] = row[WEIGHT_ADDRESS];
    out[1] = row[GRAD_ADDRESS];
  }
  return 1;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step", &step, "TLR's step for same-dtype CPU tensors (see cpu_step.cpp)");
  m.def("move", &move, "the move that a unit's end deferred");
  m.def("layout", &layout, "write or compare a group's layout record (the Triton path's host side)");
  m.def("layout_fields", []() { return LAYOUT_FIELDS; });
  m.def("layout_address_fields", []() { return std::vector<int64_t>{WEIGHT_ADDRESS, GRAD_ADDRESS}; });
  m.def("parallel_threads", &parallel_threads, "threads that at::parallel_for runs tasks on (1: built without OpenMP)");
}
