// CPU kernels for select_topk and score_and_select.
//
// select_topk is an exact radix select on order-preserving integer keys:
//
//   key(x) = bits(x) with -0.0 folded onto +0.0, then the sign bit flipped for x >= 0 and every
//   bit flipped for x < 0, so that unsigned key order == float order (and for largest=False every
//   key is inverted, turning "k smallest" into "k largest").
//
// Keys are resolved a digit at a time, most significant first, by histogram passes over the
// input: float32 keys (32 bits) in two 16-bit digits, float16/bfloat16 keys (16 bits) in one, and
// for inputs too short to amortise 2^16 counters, 11+11+10 or 8+8 bits. The input is split into
// one contiguous chunk per thread and every chunk keeps its own histograms, so after the last
// histogram pass the threshold key T is known together with, per chunk, how many keys lie
// strictly beyond T and how many equal it. The keys equal to T that are needed go to the lowest
// indices: chunk c takes clamp(need - (keys == T in chunks before c), 0, keys == T in c) of them.
// Prefix sums of the per-chunk totals give each chunk's output offset, and one branch-free
// compaction pass writes the selected indices in index order: the output is ascending without a
// sort. NaN is counted during the first pass (and raises), so no separate scan is needed.
//
// Passes over the input for large inputs: 3 for float32 (histogram, histogram, write), 2 for
// 16-bit dtypes. Each pass converts a small tile of keys (vectorised; strided reads for
// non-contiguous input, no copy) and then consumes the tile from L1. Inputs of at most 2^14
// scores take a simpler exact path (nth_element on unique (key, index) composites).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace rela::cpu {
namespace {

// Keys are converted 1024 at a time into a stack buffer that stays in L1.
constexpr int64_t kTile = 1024;
// Below this many keys per chunk, a thread's share is too small to pay for waking it up and for
// its histograms: smaller inputs use fewer chunks (threads).
constexpr int64_t kMinChunk = int64_t{1} << 17;
// Chunks at least this long use 16-bit digits (see digit_widths).
constexpr int64_t kWideDigitsFrom = int64_t{1} << 18;
// Histogram counters are uint32 (half the cache footprint of uint64): cap the chunk length.
constexpr int64_t kMaxChunk = (int64_t{1} << 32) - 1;
// Up to this size a selection over (key, index) pairs is faster than the radix passes.
constexpr int64_t kSmallN = int64_t{1} << 14;

template <typename key_t>
struct KeyTraits;
template <>
struct KeyTraits<uint32_t> {
  using signed_t = int32_t;
  static constexpr uint32_t kSign = 0x80000000u;
};
template <>
struct KeyTraits<uint16_t> {
  using signed_t = int16_t;
  static constexpr uint16_t kSign = 0x8000u;
};

// Float bits -> key such that unsigned key order is float order (inverted when flip is all ones).
// Branch-free so the tile conversion loop vectorises. NaN keys lie beyond +-inf; select_topk
// counts them during its first pass and raises, so no separate NaN scan is needed.
template <typename key_t>
inline key_t to_key(key_t bits, key_t flip) {
  using signed_t = typename KeyTraits<key_t>::signed_t;
  constexpr key_t sign = KeyTraits<key_t>::kSign;
  bits = bits == sign ? key_t{0} : bits;  // -0.0 ties with +0.0
  const key_t negative =
      static_cast<key_t>(static_cast<signed_t>(bits) >> (8 * sizeof(key_t) - 1));
  return static_cast<key_t>(bits ^ (negative | sign) ^ flip);
}

// View of the input as raw key-sized words (the kernel never reads them as floating point).
template <typename key_t>
struct Input {
  const key_t* data;
  int64_t n;
  int64_t stride;
  key_t flip;
  // Before the flip, the keys of non-NaN values are exactly [key(-inf), key(+inf)].
  key_t finite_low;
  key_t finite_span;

  void load(int64_t begin, int64_t count, key_t* out) const {
    if (stride == 1) {
      const key_t* src = data + begin;
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) out[j] = to_key(src[j], flip);
    } else {
      const key_t* src = data + begin * stride;
      for (int64_t j = 0; j < count; ++j) out[j] = to_key(src[j * stride], flip);
    }
  }

  // Calls f(first_index, tile, count) for consecutive tiles of [begin, end) until f returns false.
  template <typename F>
  void for_each_tile(int64_t begin, int64_t end, F&& f) const {
    alignas(64) key_t tile[kTile];
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t count = std::min(kTile, end - t);
      load(t, count, tile);
      if (!f(t, tile, count)) return;
    }
  }

  // NaN keys of a tile, counted branch-free (one unsigned range test) so it vectorises.
  int64_t count_nan(const key_t* tile, int64_t count) const {
    int64_t nan = 0;
#pragma omp simd reduction(+ : nan)
    for (int64_t j = 0; j < count; ++j) {
      nan += static_cast<key_t>((tile[j] ^ flip) - finite_low) > finite_span;
    }
    return nan;
  }

  // NaN count of the whole input (for the k == 0 and k == N shortcuts, which read nothing else).
  int64_t count_nan_all() const {
    return at::parallel_reduce(
        0, n, kTile * 64, int64_t{0},
        [&](int64_t begin, int64_t end, int64_t acc) {
          for_each_tile(begin, end, [&](int64_t, const key_t* tile, int64_t count) {
            acc += count_nan(tile, count);
            return true;
          });
          return acc;
        },
        std::plus<int64_t>());
  }
};

void raise_nan(int64_t nan) {
  TORCH_CHECK_VALUE(nan == 0, "rk.select_topk: scores must not contain NaN, got ", nan);
}

// Small inputs: the k-th largest of the unique 64-bit (key, reversed index) composites by
// nth_element, then one pass in index order keeps the composites at or above it (ascending output).
template <typename key_t>
void select_small(const Input<key_t>& in, int64_t k, bool check_nan, int64_t* out) {
  std::vector<key_t> keys(in.n);
  in.load(0, in.n, keys.data());
  if (check_nan) raise_nan(in.count_nan(keys.data(), in.n));
  // Equal keys: the lower index gets the larger composite, so it wins the tie.
  auto composite = [&](int64_t i) {
    return (static_cast<uint64_t>(keys[i]) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
  };
  std::vector<uint64_t> sorted(in.n);
  for (int64_t i = 0; i < in.n; ++i) sorted[i] = composite(i);
  std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(),
                   std::greater<uint64_t>());
  const uint64_t threshold = sorted[k - 1];
  int64_t pos = 0;
  for (int64_t i = 0; i < in.n && pos < k; ++i) {
    out[pos] = i;  // branch-free: always store, advance when selected; pos < k guards out[k]
    pos += composite(i) >= threshold;
  }
}

// Digit widths, most significant first. Wide digits mean fewer passes over the input but a fixed
// cost per pass of zeroing, merging and scanning 2^bits counters per chunk: 16-bit digits pay off
// for long chunks, 11- or 8-bit digits for short ones.
template <typename key_t>
std::vector<int> digit_widths(int64_t chunk_length) {
  const bool wide = chunk_length >= kWideDigitsFrom;
  if constexpr (sizeof(key_t) == 4) {
    return wide ? std::vector<int>{16, 16} : std::vector<int>{11, 11, 10};
  } else {
    return wide ? std::vector<int>{16} : std::vector<int>{8, 8};
  }
}

template <typename key_t>
void select_radix(const Input<key_t>& in, int64_t k, bool check_nan, int64_t* out) {
  constexpr int kKeyBits = static_cast<int>(8 * sizeof(key_t));
  const int64_t n = in.n;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(
      (n + kMaxChunk - 1) / kMaxChunk, std::min<int64_t>(threads, (n + kMinChunk - 1) / kMinChunk));
  auto chunk_begin = [&](int64_t c) { return n / chunks * c + std::min(c, n % chunks); };
  const std::vector<int> widths = digit_widths<key_t>(n / chunks);
  const int64_t max_bins = int64_t{1} << *std::max_element(widths.begin(), widths.end());

  std::vector<int64_t> beyond(chunks, 0);  // per chunk: keys known to be > T so far
  std::vector<int64_t> nan(chunks, 0);
  std::vector<uint32_t> hist(static_cast<size_t>(chunks * max_bins));
  std::vector<int64_t> total(max_bins);
  key_t prefix = 0;  // the digits of T resolved so far
  int64_t need = k;  // how many of the keys matching `prefix` still have to be taken
  int64_t digit = 0;
  int64_t bins = 0;
  int resolved = 0;  // leading key bits resolved so far

  for (size_t level = 0; level < widths.size(); ++level) {
    bins = int64_t{1} << widths[level];
    const uint32_t mask = static_cast<uint32_t>(bins - 1);
    const int shift = kKeyBits - resolved - widths[level];
    const int upper_shift = shift + widths[level];  // < kKeyBits from the second level on
    const key_t upper = static_cast<key_t>(level == 0 ? 0 : prefix >> upper_shift);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        uint32_t* h = hist.data() + c * bins;
        std::fill(h, h + bins, 0u);
        // Copies captured by value: stores to h could alias variables captured by reference
        // (uint32 and int may alias) and force a reload on every iteration.
        const int sh = shift, ush = upper_shift;
        const key_t up = upper;
        const uint32_t mk = mask;
        int64_t nan_count = 0;
        auto count_tile = [&, sh, ush, up, mk](int64_t, const key_t* tile, int64_t count) {
          if (level == 0) {
            for (int64_t j = 0; j < count; ++j) ++h[tile[j] >> sh];
            if (check_nan) nan_count += in.count_nan(tile, count);
            return true;
          }
          // Only keys in the bucket chosen so far count, usually a tiny fraction: a vectorised
          // test skips blocks without any.
          for (int64_t j0 = 0; j0 < count; j0 += 64) {
            const int64_t j1 = std::min(count, j0 + 64);
            int hits = 0;
#pragma omp simd reduction(+ : hits)
            for (int64_t j = j0; j < j1; ++j) hits += static_cast<key_t>(tile[j] >> ush) == up;
            if (hits == 0) continue;
            for (int64_t j = j0; j < j1; ++j) {
              if (static_cast<key_t>(tile[j] >> ush) == up) ++h[(tile[j] >> sh) & mk];
            }
          }
          return true;
        };
        in.for_each_tile(chunk_begin(c), chunk_begin(c + 1), count_tile);
        nan[c] = nan_count;
      }
    });
    if (level == 0 && check_nan) raise_nan(std::accumulate(nan.begin(), nan.end(), int64_t{0}));
    // Merging and the per-chunk sums below are cheap next to the passes over the input; they
    // go parallel only for many chunks (each parallel region costs a thread wake-up).
    const bool serial = chunks * bins <= (int64_t{1} << 20);
    at::parallel_for(0, bins, serial ? bins : 4096, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t sum = 0;
        for (int64_t c = 0; c < chunks; ++c) sum += hist[c * bins + b];
        total[b] = sum;
      }
    });
    // Walk down from the highest digit to the bucket that holds the need-th largest key.
    int64_t above = 0;
    int64_t b = bins - 1;
    while (b > 0 && above + total[b] < need) above += total[b--];
    TORCH_INTERNAL_ASSERT(above + total[b] >= need, "rela: radix select lost count of keys");
    digit = b;
    need -= above;
    prefix = static_cast<key_t>(prefix | (static_cast<key_t>(digit) << shift));
    resolved += widths[level];
    at::parallel_for(0, chunks, serial ? chunks : 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const uint32_t* h = hist.data() + c * bins;
        int64_t sum = 0;
        for (int64_t bin = digit + 1; bin < bins; ++bin) sum += h[bin];
        beyond[c] += sum;
      }
    });
  }
  const key_t threshold = prefix;

  // The last histogram counts keys == T per chunk; the lowest-index `need` of them are taken.
  std::vector<int64_t> take_equal(chunks), offset(chunks + 1, 0);
  int64_t equal_before = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t equal = hist[c * bins + digit];
    take_equal[c] = std::clamp<int64_t>(need - equal_before, 0, equal);
    equal_before += equal;
    offset[c + 1] = offset[c] + beyond[c] + take_equal[c];
  }
  TORCH_INTERNAL_ASSERT(offset[chunks] == k, "rela: radix select counted ", offset[chunks],
                        " selected keys, expected ", k);

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t pos = offset[c];
      const int64_t end = offset[c + 1];
      if (pos == end) continue;
      const int64_t quota = take_equal[c];
      int64_t equal_seen = 0;
      const key_t t = threshold;
      auto write_tile = [&, t, end, quota](int64_t first, const key_t* tile, int64_t count) {
        // Count the tile first (vectorised) to pick a loop: most tiles need no quota bookkeeping.
        int64_t n_beyond = 0, n_equal = 0;
#pragma omp simd reduction(+ : n_beyond, n_equal)
        for (int64_t j = 0; j < count; ++j) {
          n_beyond += tile[j] > t;
          n_equal += tile[j] == t;
        }
        const bool all_equal_taken = equal_seen + n_equal <= quota;
        const bool no_equal_taken = equal_seen >= quota;
        const int64_t n_selected =
            n_beyond + (all_equal_taken ? n_equal : no_equal_taken ? 0 : quota - equal_seen);
        // Branch-free compaction: always store, advance only when selected. The store after the
        // last selected key lands on out[p], which must still be this chunk's: hence the
        // checked loop for the tile holding the chunk's last selected key. (p, t, end and quota
        // are locals or copies: by reference they could alias out and be reloaded per store.)
        int64_t p = pos;
        if (n_selected == 0) {
        } else if (p + n_selected < end && all_equal_taken) {
          for (int64_t j = 0; j < count; ++j) {
            out[p] = first + j;
            p += tile[j] >= t;
          }
        } else if (p + n_selected < end && no_equal_taken) {
          for (int64_t j = 0; j < count; ++j) {
            out[p] = first + j;
            p += tile[j] > t;
          }
        } else {
          int64_t seen = equal_seen;
          for (int64_t j = 0; j < count && p < end; ++j) {
            const int64_t is_equal = tile[j] == t;
            out[p] = first + j;
            p += (tile[j] > t) | (is_equal & (seen < quota));
            seen += is_equal;
          }
        }
        pos = p;
        equal_seen += n_equal;
        return pos < end;
      };
      in.for_each_tile(chunk_begin(c), chunk_begin(c + 1), write_tile);
    }
  });
}

template <typename key_t>
Input<key_t> make_input(const at::Tensor& scores, bool largest) {
  // Bit patterns of -inf and +inf: the ends of the non-NaN key range.
  key_t neg_inf, pos_inf;
  if constexpr (sizeof(key_t) == 4) {
    neg_inf = 0xFF800000u, pos_inf = 0x7F800000u;
  } else if (scores.scalar_type() == at::kHalf) {
    neg_inf = 0xFC00u, pos_inf = 0x7C00u;
  } else {
    neg_inf = 0xFF80u, pos_inf = 0x7F80u;
  }
  const key_t low = to_key(neg_inf, key_t{0});
  return Input<key_t>{static_cast<const key_t*>(scores.const_data_ptr()),
                      scores.size(0),
                      scores.stride(0),
                      largest ? key_t{0} : static_cast<key_t>(~key_t{0}),
                      low,
                      static_cast<key_t>(to_key(pos_inf, key_t{0}) - low)};
}

template <typename key_t>
at::Tensor select_keys(const at::Tensor& scores, int64_t k, bool largest, bool check_nan) {
  const Input<key_t> in = make_input<key_t>(scores, largest);
  at::Tensor out = at::empty({k}, scores.options().dtype(at::kLong));
  if (k == 0 || k == in.n) {
    if (check_nan) raise_nan(in.count_nan_all());
    return k == 0 ? out : at::arange(in.n, out.options());
  }
  if (in.n <= kSmallN) {
    select_small(in, k, check_nan, out.data_ptr<int64_t>());
  } else {
    select_radix(in, k, check_nan, out.data_ptr<int64_t>());
  }
  return out;
}

at::Tensor select_topk_impl(const at::Tensor& scores, int64_t k, bool largest, bool check_nan) {
  TORCH_CHECK_VALUE(scores.dim() == 1, "rk.select_topk: scores must be 1-D [N], got shape ",
                    scores.sizes());
  const int64_t n = scores.size(0);
  TORCH_CHECK_VALUE(0 <= k && k <= n, "rk.select_topk: k must be in [0, ", n,
                    "] (the number of scores), got ", k);
  const auto dtype = scores.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "rk.select_topk: scores must have dtype float32/float16/bfloat16, got ", dtype);
  return dtype == at::kFloat ? select_keys<uint32_t>(scores, k, largest, check_nan)
                             : select_keys<uint16_t>(scores, k, largest, check_nan);
}

// NaN raises ValueError here, so the Python layer need not make a separate pass to look for it.
at::Tensor select_topk_cpu(const at::Tensor& scores, int64_t k, bool largest) {
  return select_topk_impl(scores, k, largest, /*check_nan=*/true);
}

std::tuple<at::Tensor, at::Tensor> score_and_select_cpu(
    const at::Tensor& z, const at::Tensor& p, const at::Tensor& mean, const at::Tensor& matrix,
    const std::optional<at::Tensor>& bias, double eps, int64_t k, bool largest) {
  TORCH_CHECK_VALUE(z.dim() == 2, "rk.score_and_select: z must be 2-D [B, d], got shape ",
                    z.sizes());
  TORCH_CHECK_VALUE(0 <= k && k <= z.size(0), "rk.score_and_select: k must be in [0, ", z.size(0),
                    "] (the number of rows), got ", k);
  // The loss kernel is another op of this library: call its CPU kernel directly (no autograd,
  // compute_grad=false, so only the [B] losses are allocated), then select on the losses.
  static const auto loss_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rela::transported_cosine_loss_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, double, bool)>();
  at::Tensor losses = std::get<0>(loss_op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), z,
                                                     p, mean, matrix, bias, eps, false));
  // Non-finite losses come from non-finite inputs; the Python layer names the input, so NaN is
  // not reported here (its key simply sorts beyond +-inf).
  return {select_topk_impl(losses, k, largest, /*check_nan=*/false), losses};
}

}  // namespace

TORCH_LIBRARY_IMPL(rela, CPU, m) {
  m.impl("select_topk", &select_topk_cpu);
  m.impl("score_and_select", &score_and_select_cpu);
}

}  // namespace rela::cpu
